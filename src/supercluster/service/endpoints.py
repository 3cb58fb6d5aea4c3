"""Endpoints: a project serves a model from one of its clusters, and calls it with its own tokens.

An endpoint is `supercluster serve RUN_DIR` running as a fleet job on the cluster's first node,
behind an API key only the service knows. Clients use the project's service token against
`/v1/projects/{project}/endpoints/{name}/v1/...` (the OpenAI routes); the service checks it,
forwards the call with the endpoint's key and records each answered call's tokens for usage
(a stream's from the usage its server puts in every chunk, so one cut short counts what it relayed).
The GPUs the cluster holds are charged as for training, from the fleet's allocation intervals.

What may be served: a run directory a training job of the same project wrote, or one in the
fleet's model library (`$SUPERCLUSTER_HOME/models`, where the operator imports open models);
never a path elsewhere, which could be another tenant's run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster import jobs as fleet_jobs
from supercluster.cluster.state import Cluster
from supercluster.errors import UserError
from supercluster.paths import home, model_library
from supercluster.service import resources
from supercluster.service.auth import Caller, ServiceError
from supercluster.service.models import Endpoint, EndpointCall, Org, Project, ServiceCluster, ServiceJob, User
from supercluster.service.store import Store
from supercluster.service.tenancy import visible_project


LIVE = ("starting", "ready", "stopping")  # an endpoint whose server may still run (its name is taken)


def view(e: Endpoint, project: str, calls: dict | None = None) -> dict:
    calls = calls or {}
    return {"name": e.name, "cluster": e.cluster, "run_dir": e.run_dir, "job_id": e.job_id, "state": e.state,
            "detail": e.detail, "created_at": e.created_at,
            "base_url": f"/v1/projects/{project}/endpoints/{e.name}/v1",
            "requests": calls.get("requests", 0), "prompt_tokens": calls.get("prompt_tokens", 0),
            "completion_tokens": calls.get("completion_tokens", 0)}


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


def _key_file(secret: str) -> Path:
    """Where the server reads its key: a file of the service's, not its command line, which `ps`
    shows every user of the node and the fleet's books keep (and print) with the job."""
    return home() / "service" / "endpoint-keys" / f"{hashlib.sha256(secret.encode()).hexdigest()[:32]}.key"


def _write_key(secret: str) -> Path:
    path = _key_file(secret)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


def _answers(url: str) -> bool:
    """Whether a server still answers at `url` (a cancelled job's processes take a moment to end)."""
    try:
        httpx.get(f"{url}/health", timeout=1.0)
        return True
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create(store: Store, caller: Caller, project: str, name: str, cluster: str, run_dir: str | None, job: int | None,
           max_running: int, quantize: str) -> dict:
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
    if backend != "local":
        # A server on another machine would need that machine's address and an open port there.
        raise ServiceError(409, f"Endpoints run on fleets of local nodes for now; this fleet's backend is {backend}.")
    port, secret = _free_port(), secrets.token_urlsafe(32)
    key_file = _write_key(secret)
    command = [sys.executable, "-m", "supercluster.cli.main", "serve", str(path), "--host", "127.0.0.1", "--port",
               str(port), "--api-key-file", str(key_file), "--max-running", str(max_running), "--quantize", quantize,
               "--served-model-name", name]
    shown = {}

    def record(s: Session, fleet_job) -> None:
        """In the fleet's transaction that writes the serving job, under its lock, before it starts:
        the endpoint's row with it, or neither (and of two requests for one name, one only)."""
        if _active(s, p.id, name):
            raise _taken(project, name)
        # A stopped or failed endpoint of the same name is started again: its calls stay counted.
        e = s.scalar(sa.select(Endpoint).where(Endpoint.project_id == p.id, Endpoint.name == name))
        if e is None:
            e = Endpoint(project_id=p.id, name=name)
            s.add(e)
        e.user_id, e.cluster, e.run_dir, e.job_id = caller.user_id, cluster, str(path), fleet_job.id
        e.url, e.secret, e.state, e.detail, e.created_at = f"http://127.0.0.1:{port}", secret, "starting", None, time.time()
        s.flush()
        shown.update(view(e, project, _calls(s, [e.id]).get(e.id)))

    try:
        fleet_jobs.submit_job(store.fleet, sc.fleet_name, str(path), command=command, max_restarts=0, record=record)
    except fleet_jobs.ClusterNotReady as err:  # the fleet queued or held it since we looked
        key_file.unlink(missing_ok=True)
        raise ServiceError(409, f"Cluster {cluster!r} is {resources.cluster_state(err.state)}; deploy once it is ready.") from None
    except ServiceError:  # the name was taken beside this request
        key_file.unlink(missing_ok=True)
        raise
    except UserError as err:
        key_file.unlink(missing_ok=True)
        raise ServiceError(409, str(err)) from None
    return shown


def _active(s: Session, project_id: int, name: str) -> bool:
    return s.scalar(sa.select(Endpoint.id).where(Endpoint.project_id == project_id, Endpoint.name == name,
                                                 Endpoint.state.in_(LIVE))) is not None


def _taken(project: str, name: str) -> ServiceError:
    return ServiceError(409, f"Project {project!r} already has an endpoint named {name!r}; delete it first "
                             "(or, while it is stopping, wait until it is stopped).")


def refresh(store: Store, endpoints: list[Endpoint]) -> None:
    """Moves starting endpoints to ready once their server answers, stopping ones to stopped once it
    no longer does, and any other whose job ended to failed."""
    for e in endpoints:
        if e.state not in LIVE:
            continue
        job = fleet_jobs.job_status(store.fleet, e.job_id)
        state, detail = e.state, e.detail
        if e.state == "stopping":
            if job["state"] in ("pending", "running") or _answers(e.url):
                continue  # its processes take a moment to end
            state, detail = "stopped", None
            _key_file(e.secret).unlink(missing_ok=True)
        elif job["state"] not in ("pending", "running"):
            state, detail = "failed", f"its serving job {job['state']}" + (f" ({job['detail']})" if job["detail"] else "")
            _key_file(e.secret).unlink(missing_ok=True)  # nothing reads it any more
        elif e.state == "starting":
            try:
                if httpx.get(f"{e.url}/health", timeout=1.0).status_code == 200:
                    state, detail = "ready", None
            except httpx.HTTPError:
                pass  # still loading the model
        if (state, detail) != (e.state, e.detail):
            with store.session() as s:
                row = s.get(Endpoint, e.id)
                row.state, row.detail = state, detail
            e.state, e.detail = state, detail


def _project_endpoints(store: Store, caller: Caller, project: str, name: str | None = None) -> tuple[list[Endpoint], dict]:
    with store.session() as s:
        p = visible_project(s, caller, project)
        query = sa.select(Endpoint).where(Endpoint.project_id == p.id).order_by(Endpoint.id)
        rows = [_get(s, p, name)] if name else list(s.scalars(query))
        s.expunge_all()
    refresh(store, rows)
    with store.reading() as s:
        calls = _calls(s, [e.id for e in rows]) if rows else {}
    return rows, calls


def show(store: Store, caller: Caller, project: str, name: str) -> dict:
    (e,), calls = _project_endpoints(store, caller, project, name)
    return view(e, project, calls.get(e.id))


def list_all(store: Store, caller: Caller, project: str) -> list[dict]:
    rows, calls = _project_endpoints(store, caller, project)
    return [view(e, project, calls.get(e.id)) for e in rows]


def delete(store: Store, caller: Caller, project: str, name: str) -> dict:
    """Stops the endpoint's server and answers at once: `stopping` until it no longer answers
    (`refresh` moves it to `stopped`, on the next look or the server's periodic pass), or
    `stopped` when nothing was running. A request thread never waits for a process to end."""
    with store.session() as s:
        p = visible_project(s, caller, project, "member")
        e = _get(s, p, name)
        job_id, active = e.job_id, e.state in ("starting", "ready")
        if active:
            e.state, e.detail = "stopping", None  # before the cancel: no call is relayed to it from now on
    if active:
        try:
            fleet_jobs.cancel_job(store.fleet, job_id)
        except UserError:
            pass  # it had ended by itself: nothing left to stop
    (e,), calls = _project_endpoints(store, caller, project, name)  # already silent: stopped now
    return view(e, project, calls.get(e.id))


def upstream(store: Store, caller: Caller, project: str, name: str) -> tuple[int, str, str]:
    """(endpoint id, server URL, its key) for a call by `caller`; members and admins may call."""
    with store.session() as s:
        p = visible_project(s, caller, project, "member")
        e = _get(s, p, name)
        e_id, url, secret, state = e.id, e.url, e.secret, e.state
    if state == "starting":
        with store.session() as s:
            row = s.get(Endpoint, e_id)
            s.expunge(row)
        refresh(store, [row])
        state = row.state
    if state != "ready":
        raise ServiceError(503, f"Endpoint {name!r} is {state}; call it once `GET .../endpoints/{name}` says ready.")
    return e_id, url, secret


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


def record(store: Store, endpoint_id: int, user_id: int | None, usage: dict | None) -> None:
    usage = usage or {}
    with store.session() as s:
        s.add(EndpointCall(endpoint_id=endpoint_id, user_id=user_id, at=time.time(),
                           prompt_tokens=int(usage.get("prompt_tokens") or 0),
                           completion_tokens=int(usage.get("completion_tokens") or 0)))


def refresh_all(store: Store) -> None:
    """The server's periodic pass: endpoints become ready, or failed when their job ends, unasked."""
    with store.session() as s:
        rows = list(s.scalars(sa.select(Endpoint).where(Endpoint.state.in_(LIVE))))
        s.expunge_all()
    refresh(store, rows)


def token_report(s: Session, *, by: str = "project", since: float | None = None, until: float | None = None,
                 project_ids: list[int] | None = None) -> list[dict]:
    """Requests and tokens answered by endpoints, grouped by org, project or user and endpoint."""
    query = (sa.select(Org.name, Project.name, User.name, Endpoint.name, sa.func.count(),
                       sa.func.sum(EndpointCall.prompt_tokens), sa.func.sum(EndpointCall.completion_tokens))
             .select_from(EndpointCall).join(Endpoint, Endpoint.id == EndpointCall.endpoint_id)
             .join(Project, Project.id == Endpoint.project_id).join(Org, Org.id == Project.org_id)
             .outerjoin(User, User.id == EndpointCall.user_id))
    if since is not None:
        query = query.where(EndpointCall.at >= since)
    if until is not None:
        query = query.where(EndpointCall.at < until)
    if project_ids is not None:
        query = query.where(Endpoint.project_id.in_(project_ids))
    totals: dict[tuple, list[int]] = {}
    for org, project, user, endpoint, n, prompt, completion in s.execute(
            query.group_by(Org.name, Project.name, User.name, Endpoint.name)):
        key = (org, project if by != "org" else None, user if by == "user" else None, endpoint if by != "org" else None)
        total = totals.setdefault(key, [0, 0, 0])
        total[0] += n
        total[1] += prompt or 0
        total[2] += completion or 0
    return [{"org": org, "project": project, "user": user, "endpoint": endpoint, "requests": n, "prompt_tokens": p,
             "completion_tokens": c} for (org, project, user, endpoint), (n, p, c) in sorted(totals.items(), key=str)]
