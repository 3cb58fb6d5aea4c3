"""Endpoints: a project serves a model from one of its clusters, and calls it with its own tokens.

An endpoint is `supercluster serve RUN_DIR` replicas running as fleet jobs on the cluster's nodes
(`service.replicas`: started, replaced and scaled between a minimum and a maximum), behind an API
key only the service knows and the service's router (`service.router`). Clients use the
project's service token against `/v1/projects/{project}/endpoints/{name}/v1/...` (the OpenAI
routes); the service checks it, forwards the call with the endpoint's key and records each
answered call's tokens for usage
(a stream's from the usage its server puts in every chunk, so one cut short counts what it relayed).
The GPUs the cluster holds are charged as for training, from the fleet's allocation intervals.

What may be served: a run directory a training job of the same project wrote, or one in the
fleet's model library (`$SUPERCLUSTER_HOME/models`, where the operator imports open models);
never a path elsewhere, which could be another tenant's run.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster import jobs as fleet_jobs
from supercluster.cluster.state import JOB_ACTIVE, Cluster, Job
from supercluster.errors import UserError
from supercluster.paths import model_library
from supercluster.service import replicas, resources
from supercluster.service.auth import Caller, ServiceError
from supercluster.service.models import (
    Endpoint,
    EndpointCall,
    EndpointReplica,
    Org,
    Project,
    ServiceCluster,
    ServiceJob,
    User,
)
from supercluster.service.router import Replica
from supercluster.service.store import Store
from supercluster.service.tenancy import visible_project


MAX_REPLICAS = 16
LIVE = ("starting", "ready", "stopping")  # an endpoint whose servers may still run (its name is taken)


def view(e: Endpoint, project: str, calls: dict | None = None, servers: list[dict] | None = None) -> dict:
    calls = calls or {}
    return {"name": e.name, "cluster": e.cluster, "run_dir": e.run_dir, "state": e.state,
            "detail": e.detail, "created_at": e.created_at,
            "base_url": f"/v1/projects/{project}/endpoints/{e.name}/v1",
            "min_replicas": e.min_replicas, "max_replicas": e.max_replicas, "replicas": e.replicas,
            "servers": servers or [],
            "requests": calls.get("requests", 0), "prompt_tokens": calls.get("prompt_tokens", 0),
            "completion_tokens": calls.get("completion_tokens", 0)}


def _servers(s: Session, endpoint_id: int) -> list[dict]:
    """The endpoint's live replicas (and the latest ended one of each index), with the calls each answered."""
    rows = list(s.scalars(sa.select(EndpointReplica).where(EndpointReplica.endpoint_id == endpoint_id)
                          .order_by(EndpointReplica.index, EndpointReplica.id)))
    calls = {i: (n, c or 0) for i, n, c in s.execute(
        sa.select(EndpointCall.replica, sa.func.count(), sa.func.sum(EndpointCall.completion_tokens))
        .where(EndpointCall.endpoint_id == endpoint_id).group_by(EndpointCall.replica))}
    latest = {}
    for r in rows:
        if r.state in replicas.LIVE or latest.get(r.index) is None or latest[r.index].state not in replicas.LIVE:
            latest[r.index] = r
    return [{"index": r.index, "state": r.state, "detail": r.detail, "job_id": r.job_id, "started_at": r.started_at,
             "requests": calls.get(r.index, (0, 0))[0], "completion_tokens": calls.get(r.index, (0, 0))[1]}
            for r in latest.values()]


def _calls(s: Session, endpoint_ids: list[int]) -> dict[int, dict]:
    rows = s.execute(sa.select(EndpointCall.endpoint_id, sa.func.count(), sa.func.sum(EndpointCall.prompt_tokens),
                               sa.func.sum(EndpointCall.completion_tokens))
                     .where(EndpointCall.endpoint_id.in_(endpoint_ids)).group_by(EndpointCall.endpoint_id))
    return {eid: {"requests": n, "prompt_tokens": p or 0, "completion_tokens": c or 0} for eid, n, p, c in rows}


def _get(s: Session, p: Project, name: str) -> Endpoint:
    e = s.scalar(sa.select(Endpoint).where(Endpoint.project_id == p.id, Endpoint.name == name))
    if e is None:
        raise ServiceError(404, f"Project {p.name!r} has no endpoint named {name!r}.")
    return e


def _run_dir(store: Store, p: Project, run_dir: str | None, job: int | None) -> Path:
    """The run directory to serve, checked to be this project's or the model library's."""
    if job is not None:
        with store.reading() as s:
            sj = s.get(ServiceJob, job)
            if sj is None or sj.project_id != p.id:
                raise ServiceError(404, f"Project {p.name!r} has no job {job}.")
        path = Path(fleet_jobs.job_status(store.fleet, job)["run_dir"])
    else:
        library = model_library().resolve()
        path = (library / run_dir).resolve()  # an absolute run_dir stays itself
        if not path.is_relative_to(library):
            raise ServiceError(403, f"Serve a run directory of this project's jobs (`job`) or one in the model library "
                                    f"({library}); {run_dir!r} is neither.")
    if not (path / "config.toml").is_file():
        raise ServiceError(422, f"{str(path)!r} holds no model yet (no config.toml); train or import one into it first.")
    return path


def _answers(url: str) -> bool:
    """Whether a server still answers at `url` (a cancelled job's processes take a moment to end)."""
    try:
        httpx.get(f"{url}/health", timeout=1.0)
        return True
    except httpx.HTTPError:
        return False


def check_replicas(min_replicas: int, max_replicas: int | None) -> tuple[int, int]:
    """(min, max) replicas asked for, checked; max defaults to min."""
    max_replicas = min_replicas if max_replicas is None else max_replicas
    if not 1 <= min_replicas <= MAX_REPLICAS:
        raise ServiceError(400, f"min_replicas must be between 1 and {MAX_REPLICAS}, got {min_replicas}.")
    if not min_replicas <= max_replicas <= MAX_REPLICAS:
        raise ServiceError(400, f"max_replicas must be between min_replicas ({min_replicas}) and {MAX_REPLICAS}, "
                                f"got {max_replicas}.")
    return min_replicas, max_replicas


def create(store: Store, caller: Caller, project: str, name: str, cluster: str, run_dir: str | None, job: int | None,
           max_running: int, quantize: str, min_replicas: int = 1, max_replicas: int | None = None) -> dict:
    min_replicas, max_replicas = check_replicas(min_replicas, max_replicas)
    with store.reading() as s:  # the fleet's state, read beside the service's rows
        p = visible_project(s, caller, project, "member")
        if _active(s, p.id, name):
            raise _taken(project, name)
        sc = s.scalar(sa.select(ServiceCluster).where(ServiceCluster.project_id == p.id, ServiceCluster.name == cluster))
        if sc is None:
            raise ServiceError(404, f"Project {project!r} has no cluster named {cluster!r}.")
        state = resources.cluster_state(s.scalar(sa.select(Cluster.state).where(Cluster.name == sc.fleet_name)))
        backend = store.fleet.fleet(s).backend
    if state != "ready":
        raise ServiceError(409, f"Cluster {cluster!r} is {state}; deploy once it is ready.")
    path = _run_dir(store, p, run_dir, job)
    secret = secrets.token_urlsafe(32)
    key_file = replicas.write_key(secret)
    # A stopped or failed endpoint of the same name is started again: its calls stay counted.
    with store.reading() as s:
        e = s.scalar(sa.select(Endpoint).where(Endpoint.project_id == p.id, Endpoint.name == name)) or Endpoint(
            project_id=p.id, name=name)
    e.user_id, e.cluster, e.run_dir, e.secret, e.max_running, e.quantize = (caller.user_id, cluster, str(path), secret,
                                                                            max_running, quantize)
    e.min_replicas, e.max_replicas, e.replicas, e.scaled_at = min_replicas, max_replicas, min_replicas, None
    e.state, e.detail, e.created_at = "starting", None, time.time()
    shown = {}

    def record(s: Session, _fleet_job) -> None:
        """In the fleet's transaction that writes replica 0's job, under its lock, before it starts:
        the endpoint's row with it, or neither (and of two requests for one name, one only)."""
        if _active(s, p.id, name):
            raise _taken(project, name)
        row = s.merge(e)
        s.flush()
        e.id = row.id
        shown.update(view(row, project, _calls(s, [row.id]).get(row.id)))

    try:
        replicas.start(store, e, sc.fleet_name, backend, 0, record=record)
        for index in range(1, min_replicas):
            replicas.start(store, e, sc.fleet_name, backend, index)
    except fleet_jobs.ClusterNotReady as err:  # the fleet queued or held it since we looked
        if not shown:
            key_file.unlink(missing_ok=True)
            raise ServiceError(409, f"Cluster {cluster!r} is {resources.cluster_state(err.state)}; deploy once it is ready.") from None
    except ServiceError:  # the name was taken beside this request
        key_file.unlink(missing_ok=True)
        raise
    except UserError as err:
        if not shown:
            key_file.unlink(missing_ok=True)
            raise ServiceError(409, str(err)) from None
    # A later replica that could not start now is started by the scaler's next pass.
    return shown


def _active(s: Session, project_id: int, name: str) -> bool:
    return s.scalar(sa.select(Endpoint.id).where(Endpoint.project_id == project_id, Endpoint.name == name,
                                                 Endpoint.state.in_(LIVE))) is not None


def _taken(project: str, name: str) -> ServiceError:
    return ServiceError(409, f"Project {project!r} already has an endpoint named {name!r}; delete it first "
                             "(or, while it is stopping, wait until it is stopped).")


def refresh(store: Store, endpoints: list[Endpoint]) -> None:
    """Replicas (and so endpoints) to ready once their server answers, to failed when their job
    ended; stopping endpoints to stopped once none of their servers runs or answers."""
    replicas.refresh(store, endpoints)
    for e in endpoints:
        if e.state == "stopping" and not _still_running(store, e):
            with store.session() as s:
                row = s.get(Endpoint, e.id)
                row.state, row.detail = "stopped", None
            e.state, e.detail = "stopped", None
        if e.state in ("failed", "stopped"):
            replicas.key_file(e.secret).unlink(missing_ok=True)  # nothing reads it any more


def _still_running(store: Store, e: Endpoint) -> bool:
    """Whether a replica of the endpoint's deployment still runs (its job) or answers (its processes end last)."""
    fleet_jobs.refresh(store.fleet)
    with store.reading() as s:
        rows = list(s.scalars(sa.select(EndpointReplica).where(EndpointReplica.endpoint_id == e.id,
                                                               EndpointReplica.started_at >= e.created_at)))
        running = s.scalar(sa.select(Job.id).where(Job.id.in_([r.job_id for r in rows if r.job_id]),
                                                   Job.state.in_(JOB_ACTIVE)).limit(1))
    return running is not None or any(r.url and _answers(r.url) for r in rows)


def _project_endpoints(store: Store, caller: Caller, project: str, name: str | None = None) -> tuple[list[Endpoint], dict, dict]:
    with store.session() as s:
        p = visible_project(s, caller, project)
        query = sa.select(Endpoint).where(Endpoint.project_id == p.id).order_by(Endpoint.id)
        rows = [_get(s, p, name)] if name else list(s.scalars(query))
        s.expunge_all()
    refresh(store, rows)
    with store.reading() as s:
        calls = _calls(s, [e.id for e in rows]) if rows else {}
        servers = {e.id: _servers(s, e.id) for e in rows}
    return rows, calls, servers


def show(store: Store, caller: Caller, project: str, name: str) -> dict:
    (e,), calls, servers = _project_endpoints(store, caller, project, name)
    return view(e, project, calls.get(e.id), servers[e.id])


def list_all(store: Store, caller: Caller, project: str) -> list[dict]:
    rows, calls, servers = _project_endpoints(store, caller, project)
    return [view(e, project, calls.get(e.id), servers[e.id]) for e in rows]


def delete(store: Store, caller: Caller, project: str, name: str) -> dict:
    """Stops the endpoint's servers and answers at once: `stopping` until none answers any more
    (`refresh` moves it to `stopped`, on the next look or the server's periodic pass), or
    `stopped` when nothing was running. A request thread never waits for a process to end."""
    with store.session() as s:
        p = visible_project(s, caller, project, "member")
        e = _get(s, p, name)
        if e.state in ("starting", "ready"):
            # Before the cancels: no call is relayed to it, and the scaler starts no replica for it, from now on.
            e.state, e.detail = "stopping", None
        live = list(s.scalars(sa.select(EndpointReplica).where(EndpointReplica.endpoint_id == e.id,
                                                               EndpointReplica.state.in_(replicas.LIVE))))
        s.expunge_all()
    for r in live:
        replicas.stop(store, r)
    return show(store, caller, project, name)  # already silent: stopped now


def upstream(store: Store, caller: Caller, project: str, name: str) -> tuple[int, list[Replica], str]:
    """(endpoint id, its ready replicas, their key) for a call by `caller`; members and admins may call."""
    with store.reading() as s:
        p = visible_project(s, caller, project, "member")
        e = _get(s, p, name)
    if e.state == "starting":
        refresh(store, [e])
    if e.state not in ("starting", "ready"):
        raise ServiceError(503, f"Endpoint {name!r} is {e.state}; call it once `GET .../endpoints/{name}` says ready.")
    with store.reading() as s:
        ready = [Replica(r.index, r.url) for r in s.scalars(sa.select(EndpointReplica).where(
            EndpointReplica.endpoint_id == e.id, EndpointReplica.state == "ready").order_by(EndpointReplica.index))]
    if not ready:
        what = "starting" if e.state == "starting" else "replacing its replicas"
        raise ServiceError(503, f"Endpoint {name!r} is {what}; call it once `GET .../endpoints/{name}` says ready.")
    return e.id, ready, e.secret


def usage_of_answer(data: bytes) -> dict | None:
    """The usage of a whole (not streamed) OpenAI answer, else None."""
    try:
        return json.loads(data).get("usage")
    except (ValueError, AttributeError):
        return None


def stream_options(asked: object) -> dict:
    """The stream options the service sends for a client's: a usage in every chunk (vLLM's
    `continuous_usage_stats`), so that a stream cut short, by its client or by its server
    dying, still counts the tokens it relayed."""
    asked = asked if isinstance(asked, dict) else {}
    return {**asked, "include_usage": True, "continuous_usage_stats": True}


class StreamTally:
    """Passes a relayed stream's events on as the client asked for them, and keeps the usage so far."""

    def __init__(self, asked: object):
        asked = asked if isinstance(asked, dict) else {}
        self.include_usage = bool(asked.get("include_usage"))
        self.continuous = self.include_usage and bool(asked.get("continuous_usage_stats"))
        self.usage: dict | None = None
        self.done = False  # the server's `data: [DONE]` came

    def pass_on(self, event: bytes) -> bytes | None:
        """The event for the client, or None when it did not ask for it."""
        if event.strip() == b"data: [DONE]":
            self.done = True
        if not event.startswith(b"data: {"):
            return event
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return event
        if not isinstance(chunk, dict) or not isinstance(chunk.get("usage"), dict):
            return event
        self.usage = chunk["usage"]
        if not chunk.get("choices"):  # the final usage chunk
            return event if self.include_usage else None
        if self.continuous:
            return event
        del chunk["usage"]  # asked for by the service, not by the client
        return b"data: " + json.dumps(chunk).encode()


def error_event(message: str) -> bytes:
    """An error as a stream event in OpenAI's error body, for a stream whose server failed mid-way."""
    return b"data: " + json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                             "code": 502}}).encode()


def record(store: Store, endpoint_id: int, replica: int | None, user_id: int | None, usage: dict | None) -> None:
    usage = usage or {}
    with store.session() as s:
        s.add(EndpointCall(endpoint_id=endpoint_id, replica=replica, user_id=user_id, at=time.time(),
                           prompt_tokens=int(usage.get("prompt_tokens") or 0),
                           completion_tokens=int(usage.get("completion_tokens") or 0)))


def refresh_all(store: Store) -> None:
    """The server's periodic pass: endpoints become ready, or failed when their job ends, unasked."""
    with store.session() as s:
        rows = list(s.scalars(sa.select(Endpoint).where(Endpoint.state.in_(LIVE))))
        s.expunge_all()
    refresh(store, rows)


_token_queries: dict[tuple, sa.Select] = {}  # built once per shape: every usage report asks (building cost more than running)


def _token_query(since: bool, until: bool, projects: bool) -> sa.Select:
    """`token_report`'s query; with `since`, `until`, `projects`: filtered by :since, :until, :project_ids."""
    key = (since, until, projects)
    query = _token_queries.get(key)
    if query is None:
        query = (sa.select(Org.name, Project.name, User.name, Endpoint.name, sa.func.count(),
                           sa.func.sum(EndpointCall.prompt_tokens), sa.func.sum(EndpointCall.completion_tokens))
                 .select_from(EndpointCall).join(Endpoint, Endpoint.id == EndpointCall.endpoint_id)
                 .join(Project, Project.id == Endpoint.project_id).join(Org, Org.id == Project.org_id)
                 .outerjoin(User, User.id == EndpointCall.user_id))
        if since:
            query = query.where(EndpointCall.at >= sa.bindparam("since", type_=sa.Float))
        if until:
            query = query.where(EndpointCall.at < sa.bindparam("until", type_=sa.Float))
        if projects:
            query = query.where(Endpoint.project_id.in_(sa.bindparam("project_ids", expanding=True)))
        query = _token_queries[key] = query.group_by(Org.name, Project.name, User.name, Endpoint.name)
    return query


def token_report(s: Session, *, by: str = "project", since: float | None = None, until: float | None = None,
                 project_ids: list[int] | None = None) -> list[dict]:
    """Requests and tokens answered by endpoints, grouped by org, project or user and endpoint."""
    query = _token_query(since is not None, until is not None, project_ids is not None)
    params = {"since": since, "until": until, "project_ids": project_ids}
    totals: dict[tuple, list[int]] = {}
    for org, project, user, endpoint, n, prompt, completion in s.execute(
            query, {k: v for k, v in params.items() if v is not None}):
        key = (org, project if by != "org" else None, user if by == "user" else None, endpoint if by != "org" else None)
        total = totals.setdefault(key, [0, 0, 0])
        total[0] += n
        total[1] += prompt or 0
        total[2] += completion or 0
    return [{"org": org, "project": project, "user": user, "endpoint": endpoint, "requests": n, "prompt_tokens": p,
             "completion_tokens": c} for (org, project, user, endpoint), (n, p, c) in sorted(totals.items(), key=str)]
