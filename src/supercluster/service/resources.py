"""A project's clusters, jobs and quota, carried out by `supercluster.cluster`.

Cluster names are global in the fleet, so a project's cluster `train` lives there as
`p<project id>.<name>`. Quotas are per project and GPU type: past `max_gpus` concurrent GPUs a
request waits here (state `waiting`, with the reason) until the project's own clusters free
enough; past the `gpu_hours` budget a new request is refused. A cluster holds GPUs, and is
charged, from the moment the fleet places it until it is deleted (one usage interval).

Calls into `cluster` open their own transactions, so a request reads and writes the service
tables around them, never across them, except for a cluster's own row, which its `record` hook
writes inside the fleet's transaction that creates or deletes the cluster (so the two books never
disagree); one lock per server process keeps those steps of concurrent requests from interleaving.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster import clusters as fleet_clusters
from supercluster.cluster import jobs as fleet_jobs
from supercluster.cluster.backends import canonical_gpu_type
from supercluster.cluster.isolation import JobArea, PathRefused
from supercluster.cluster.state import Job, Node
from supercluster.errors import UserError
from supercluster.paths import data_library, model_library, project_area
from supercluster.service import usage
from supercluster.service.auth import Caller, ServiceError
from supercluster.service.models import Project, Quota, ServiceCluster, ServiceJob
from supercluster.service.store import Store
from supercluster.service.tenancy import visible_project

_lock = threading.RLock()


def fleet_name(project: Project, name: str) -> str:
    return f"p{project.id}.{name}"


def project_names(store: Store) -> dict[int, str]:
    with store.reading() as s:  # no write lock: callers may be between calls into the fleet
        return project_names_in(s)


def project_names_in(s: Session) -> dict[int, str]:
    return dict(s.execute(sa.select(Project.id, Project.name)).all())


def fleet_text(names: dict[int, str], text: str | None) -> str | None:
    """The fleet's words with its cluster names (`p<id>.<name>`) written as the service's `project/name`."""
    if not text:
        return text
    return _FLEET_NAME.sub(lambda m: f"{names.get(int(m[1]), 'p' + m[1])}/{m[2]}", text)


_FLEET_NAME = re.compile(r"(?:cluster )?'p(\d+)\.([A-Za-z0-9._-]+)'")


def cluster_view(names: dict[int, str], sc: ServiceCluster, project: str, fleet: dict | None) -> dict:
    """The fleet's state and reason (a preemption, a budget hold), or the quota's while it waits here."""
    view = {"name": sc.name, "project": project, "state": sc.state, "reason": sc.reason, "priority": sc.priority, "gpus": sc.gpus,
            "gpu_type": sc.gpu_type, "created_at": sc.created_at, "nodes": [], "leaves": None, "pods": None,
            "queue_position": None, "placed_at": None, "jobs": []}
    if fleet is not None:
        view.update({k: fleet[k] for k in ("nodes", "leaves", "pods", "queue_position", "placed_at", "jobs")})
        view["nodes"] = [{k: n[k] for k in ("name", "gpus", "leaf", "pod", "status")} for n in fleet["nodes"]]
        # held: stopped for the project's budget, it waits for the operator as a quota wait does
        view["state"] = "waiting" if fleet["state"] == "held" else fleet["state"]
        view["reason"] = None if fleet["state"] == "ready" else (fleet_text(names, fleet["detail"]) or "waiting for free nodes in the fleet")
    return view


# ---- quota ---------------------------------------------------------------------------------------


def _in_use(s: Session, project_id: int, gpu_type: str) -> int:
    """GPUs the project has handed to the fleet (queued there or placed) of one type."""
    return int(s.scalar(sa.select(sa.func.coalesce(sa.func.sum(ServiceCluster.gpus), 0)).where(
        ServiceCluster.project_id == project_id, ServiceCluster.gpu_type == gpu_type,
        ServiceCluster.state.in_(("queued", "ready")))))


def quota_view(s: Session, project: Project) -> dict:
    types = set(s.scalars(sa.select(Quota.gpu_type).where(Quota.project_id == project.id)))
    types |= set(s.scalars(sa.select(ServiceCluster.gpu_type).where(ServiceCluster.project_id == project.id)))
    rows = []
    for gpu_type in sorted(types):
        q = s.get(Quota, (project.id, gpu_type))
        rows.append({"gpu_type": gpu_type, "max_gpus": q.max_gpus if q else None, "gpu_hours": q.gpu_hours if q else None,
                     "max_priority": q.max_priority if q else 0,
                     "used_gpus": _in_use(s, project.id, gpu_type),
                     "used_gpu_hours": usage.gpu_seconds(s, project.id, gpu_type) / 3600})
    return {"project": project.name, "quotas": rows}


def set_quota(s: Session, project: Project, gpu_type: str, max_gpus: int | None, gpu_hours: float | None,
              max_priority: int = 0) -> dict:
    gpu_type = _gpu_type(gpu_type)
    used = _in_use(s, project.id, gpu_type)
    if max_gpus is not None and max_gpus < used:
        raise ServiceError(409, f"Project {project.name!r} already holds {used} {gpu_type} GPUs; set max_gpus to {used} or more, or delete clusters first.")
    spent = usage.gpu_seconds(s, project.id, gpu_type) / 3600
    if gpu_hours is not None and gpu_hours < spent:
        raise ServiceError(409, f"Project {project.name!r} already used {spent:.3f} {gpu_type} GPU-hours; set gpu_hours to at least that.")
    q = s.get(Quota, (project.id, gpu_type)) or Quota(project_id=project.id, gpu_type=gpu_type)
    q.max_gpus, q.gpu_hours, q.max_priority = max_gpus, gpu_hours, max_priority
    s.add(q)
    s.flush()
    return quota_view(s, project)


def _gpu_type(name: str) -> str:
    try:
        return canonical_gpu_type(name)
    except UserError as err:
        raise ServiceError(422, str(err)) from None


def _resolve_gpu_type(s: Session, gpu_type: str | None) -> str:
    types = sorted(set(s.scalars(sa.select(Node.gpu_type).distinct())))
    if not types:
        raise ServiceError(409, "The fleet has no nodes yet; the operator runs `supercluster fleet init` first.")
    if gpu_type is None:
        if len(types) > 1:
            raise ServiceError(422, f"The fleet has several GPU types; pass gpu_type, one of {', '.join(types)}.")
        return types[0]
    gpu_type = _gpu_type(gpu_type)
    if gpu_type not in types:
        raise ServiceError(422, f"The fleet has no {gpu_type} nodes; use gpu_type {' or '.join(types)}.")
    return gpu_type


def _quota_decision(s: Session, project: Project, gpu_type: str, gpus: int) -> str | None:
    """None when the request may go to the fleet now, else why it waits; raises when it never may."""
    q = s.get(Quota, (project.id, gpu_type))
    if q is None:
        return None
    if q.gpu_hours is not None:
        spent = usage.gpu_seconds(s, project.id, gpu_type) / 3600
        if spent >= q.gpu_hours:
            raise ServiceError(403, f"Project {project.name!r} has spent its {q.gpu_hours:g} {gpu_type} GPU-hour budget; ask the operator to raise it.")
    if q.max_gpus is not None:
        if gpus > q.max_gpus:
            raise ServiceError(403, f"{gpus} GPUs is more than project {project.name!r}'s quota of {q.max_gpus} {gpu_type} GPUs; ask for at most {q.max_gpus}.")
        used = _in_use(s, project.id, gpu_type)
        if used + gpus > q.max_gpus:
            return f"waiting for quota: {used} of {q.max_gpus} {gpu_type} GPUs in use by project {project.name!r}"
    return None


# ---- clusters ------------------------------------------------------------------------------------


def _fleet_create(store: Store, sc: ServiceCluster, record=None) -> dict:
    """Hands the cluster to the fleet, which places it, queues it or preempts lower priorities for it."""
    try:
        return fleet_clusters.create_cluster(store.fleet, sc.fleet_name, sc.gpus, gpu_type=sc.gpu_type, wait=True,
                                             max_switches=sc.max_switches, require_health=sc.require_health,
                                             owner=usage.owner_tag(sc.project_id, sc.user_id), priority=sc.priority,
                                             record=record)
    except UserError as err:
        raise ServiceError(422, str(err)) from None


def create_cluster(store: Store, caller: Caller, project: str, name: str, gpus: int, gpu_type: str | None,
                   max_switches: int | None, require_health: bool, priority: int = 0) -> dict:
    with _lock:
        with store.reading() as s:  # reads only; the lock keeps this server's other writers out meanwhile
            p = visible_project(s, caller, project, "member")
            if s.scalar(sa.select(ServiceCluster.id).where(ServiceCluster.project_id == p.id, ServiceCluster.name == name)):
                raise ServiceError(409, f"Project {project!r} already has a cluster named {name!r}; choose another name or delete it first.")
            gpu_type = _resolve_gpu_type(s, gpu_type)
            if priority:
                q = s.get(Quota, (p.id, gpu_type))
                allowed = q.max_priority if q else 0
                if priority > allowed:
                    raise ServiceError(403, f"Project {project!r} may ask for priority up to {allowed} on {gpu_type}; ask the operator to raise it.")
            reason = _quota_decision(s, p, gpu_type, gpus)
            sc = ServiceCluster(project_id=p.id, user_id=caller.user_id, name=name, fleet_name=fleet_name(p, name), gpus=gpus,
                                gpu_type=gpu_type, max_switches=max_switches, require_health=require_health,
                                state="waiting", reason=reason, priority=priority, created_at=time.time())
        fleet = None
        if reason is None:
            def record(s: Session, shown: dict) -> None:  # in the fleet's transaction: both rows or neither
                sc.state = shown["state"]
                s.add(sc)

            fleet = _fleet_create(store, sc, record)  # refuses sizes that never fit: nothing kept on either side
        else:
            with store.session() as s:
                s.add(sc)
    return cluster_view(project_names(store), sc, project, fleet)


def undrain_node(store: Store, node: str) -> list[str]:
    """Returns a drained node to service; the clusters that started on it, as `project/name`."""
    from supercluster.cluster.fleet import resume_node

    with _lock:  # it places clusters: one step among the creates and deletes of this server's requests
        started = resume_node(node, db=store.fleet, only_if_out=True)
    names = project_names(store)
    return [fleet_text(names, f"'{c}'") for c in started]


def reconcile(store: Store) -> None:
    """Hands the fleet the clusters the quota held back (or a budget stopped) once the quota allows them."""
    with store.reading() as s:  # the common case, nothing waits here: one cheap query and no lock
        if not s.scalar(sa.select(ServiceCluster.id).where(ServiceCluster.state.in_(("waiting", "held"))).limit(1)):
            return
    with _lock:
        with store.session() as s:
            waiting = s.scalars(sa.select(ServiceCluster).where(ServiceCluster.state.in_(("waiting", "held")))
                                .order_by(ServiceCluster.id)).all()
            startable = []
            for sc in waiting:
                p = s.get(Project, sc.project_id)
                try:
                    if _quota_decision(s, p, sc.gpu_type, sc.gpus) is None:
                        startable.append((sc.id, sc.state))
                        sc.state = "queued"  # counted in use at once, so the next waiting one sees it
                except ServiceError as err:  # budget spent while it waited: it stays, saying why
                    sc.reason = err.message
        for sc_id, was in startable:
            with store.session() as s:
                sc = s.get(ServiceCluster, sc_id)
            try:
                if was == "held":
                    fleet = fleet_clusters.release_cluster(store.fleet, sc.fleet_name)
                else:
                    fleet = _fleet_create(store, sc)
            except (UserError, ServiceError) as err:
                with store.session() as s:
                    row = s.get(ServiceCluster, sc_id)
                    row.state, row.reason = was, getattr(err, "message", str(err))
                continue
            with store.session() as s:
                row = s.get(ServiceCluster, sc_id)
                row.state, row.reason = fleet["state"], None


def _get(s: Session, p: Project, name: str) -> ServiceCluster:
    sc = s.scalar(sa.select(ServiceCluster).where(ServiceCluster.project_id == p.id, ServiceCluster.name == name))
    if sc is None:
        raise ServiceError(404, f"Project {p.name!r} has no cluster named {name!r}.")
    return sc


def _fleet_views(s: Session, scs) -> dict[str, dict]:
    """The fleet's view of each cluster handed to it, by fleet name (one read for all of them)."""
    return fleet_clusters.show_clusters_in(s, [sc.fleet_name for sc in scs if sc.state != "waiting"])


def show_cluster(store: Store, caller: Caller, project: str, name: str) -> dict:
    reconcile(store)
    with store.reading() as s:  # one snapshot of both the service's tables and the fleet's
        sc = _get(s, visible_project(s, caller, project), name)
        return cluster_view(project_names_in(s), sc, project, _fleet_views(s, [sc]).get(sc.fleet_name))


def list_clusters(store: Store, caller: Caller, project: str) -> list[dict]:
    reconcile(store)
    with store.reading() as s:  # one snapshot of both the service's tables and the fleet's
        p = visible_project(s, caller, project)
        # Plain rows (read by attribute, as the ORM's objects are): a project may hold hundreds.
        query = sa.select(*ServiceCluster.__table__.c).where(ServiceCluster.project_id == p.id).order_by(ServiceCluster.id)
        rows = s.execute(query).all()
        names, fleet = project_names_in(s), _fleet_views(s, rows)
    return [cluster_view(names, sc, project, fleet.get(sc.fleet_name)) for sc in rows]


def delete_cluster(store: Store, caller: Caller, project: str, name: str, force: bool) -> dict:
    with _lock:
        with store.reading() as s:  # reads only; the lock keeps this server's other writers out meanwhile
            sc = _get(s, visible_project(s, caller, project, "member"), name)
        forget = sa.delete(ServiceCluster).where(ServiceCluster.id == sc.id)
        if sc.state != "waiting":
            try:  # the service's row goes in the fleet's transaction: both or neither
                fleet_clusters.delete_cluster(store.fleet, sc.fleet_name, force=force, record=lambda s: s.execute(forget))
            except UserError as err:
                raise ServiceError(409, str(err).replace("--force", "?force=true")) from None
        else:
            with store.session() as s:
                s.execute(forget)
    reconcile(store)
    return {"name": name, "project": project, "state": "deleted"}


# ---- jobs ----------------------------------------------------------------------------------------


def _configs_dir() -> Path:
    from supercluster.hardware.local import home

    return home() / "service" / "configs"


def job_view(job: dict, cluster: str, names: dict[int, str] | None = None) -> dict:
    """The fleet's job; `detail` says why a preempted one waits (it restarts from its checkpoint)."""
    keep = ("id", "state", "overrides", "restarts", "max_restarts", "preemptions", "exit_code", "detail", "submitted_at", "ended_at")
    view = {**{k: job[k] for k in keep}, "cluster": cluster}
    if names is not None:
        view["detail"] = fleet_text(names, view["detail"])
    return view


def job_area(store: Store, p: Project) -> JobArea:
    """What a project's jobs may read: its own area (where relative paths start), the shared data
    and model libraries, and the folders of its own earlier jobs (to continue from their runs)."""
    with store.reading() as s:
        mine = sa.select(ServiceJob.job_id).where(ServiceJob.project_id == p.id)
        job_dirs = [Path(d) for d in s.scalars(sa.select(Job.job_dir).where(Job.id.in_(mine)))]
    area = project_area(p.id)
    return JobArea(base=area, readable=(area, data_library(), model_library(), *job_dirs), owner=f"project {p.name!r}")


def submit_job(store: Store, caller: Caller, project: str, cluster: str, config: dict, overrides: list[str],
               max_restarts: int) -> dict:
    import tomli_w

    with store.session() as s:
        p = visible_project(s, caller, project, "member")
        sc = _get(s, p, cluster)
    if sc.state != "ready":
        raise ServiceError(409, f"Cluster {cluster!r} is {sc.state}; submit once it is ready.")
    path = _configs_dir() / f"{uuid.uuid4().hex}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text(tomli_w.dumps(config))
    except (TypeError, ValueError) as err:
        raise ServiceError(422, f"The config cannot be written as TOML ({err}); send sections of plain values.") from None
    try:
        job = fleet_jobs.submit_job(store.fleet, sc.fleet_name, str(path), overrides, max_restarts=max_restarts,
                                    area=job_area(store, p))
    except UserError as err:
        path.unlink(missing_ok=True)
        raise ServiceError(403 if isinstance(err, PathRefused) else 422, str(err)) from None
    with store.session() as s:
        s.add(ServiceJob(job_id=job["id"], project_id=p.id, user_id=caller.user_id, cluster=cluster, created_at=time.time()))
    return job_view(job, cluster)


def _job(store: Store, caller: Caller, project: str, job_id: int, role: str = "viewer") -> ServiceJob:
    with store.session() as s:
        p = visible_project(s, caller, project, role)
        sj = s.get(ServiceJob, job_id)
        if sj is None or sj.project_id != p.id:
            raise ServiceError(404, f"Project {project!r} has no job {job_id}.")
        return sj


def job_status(store: Store, caller: Caller, project: str, job_id: int) -> dict:
    sj = _job(store, caller, project, job_id)
    return job_view(fleet_jobs.job_status(store.fleet, job_id), sj.cluster, project_names(store))


def list_jobs(store: Store, caller: Caller, project: str) -> list[dict]:
    with store.session() as s:
        p = visible_project(s, caller, project)
        mine = {sj.job_id: sj for sj in s.scalars(sa.select(ServiceJob).where(ServiceJob.project_id == p.id))}
    if not mine:
        return []
    names = project_names(store)
    return [job_view(j, mine[j["id"]].cluster, names) for j in fleet_jobs.list_jobs(store.fleet) if j["id"] in mine]


def cancel_job(store: Store, caller: Caller, project: str, job_id: int) -> dict:
    sj = _job(store, caller, project, job_id, "member")
    try:
        return job_view(fleet_jobs.cancel_job(store.fleet, job_id), sj.cluster)
    except UserError as err:
        raise ServiceError(409, str(err)) from None


def job_log(store: Store, caller: Caller, project: str, job_id: int) -> Path:
    _job(store, caller, project, job_id)
    return fleet_jobs.log_path(store.fleet, job_id)


def job_active(store: Store, job_id: int) -> bool:
    return fleet_jobs.job_status(store.fleet, job_id)["state"] in ("pending", "running")


def job_status_raw(store: Store, job_id: int) -> str:
    return fleet_jobs.job_status(store.fleet, job_id)["state"]


def fleet_names(s: Session, caller: Caller) -> dict[str, str]:
    """Fleet cluster name -> the name the caller knows it by, for the clusters the caller may see."""
    query = sa.select(ServiceCluster.fleet_name, ServiceCluster.name, ServiceCluster.project_id)
    if not caller.is_operator:
        query = query.where(ServiceCluster.project_id == caller.project_id)
    rows = s.execute(query).all()
    if caller.is_operator:
        projects = {p.id: p.name for p in s.scalars(sa.select(Project))}
        return {f: f"{projects[pid]}/{n}" for f, n, pid in rows}
    return {f: n for f, n, _ in rows}


def job_metrics(store: Store, caller: Caller, project: str, job_id: int, limit: int = 5000) -> list[dict]:
    """The last `limit` step records of the job's metrics.jsonl (a line still being written is skipped)."""
    import json

    _job(store, caller, project, job_id)
    path = Path(fleet_jobs.job_status(store.fleet, job_id)["run_dir"]) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines[-limit:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            steps.append(record)
    return steps


def enforce_budgets(store: Store, at: float | None = None) -> list[str]:
    """Stops the clusters of every project past its GPU-hour budget (up to `at`, default now).

    The fleet holds them (`hold_cluster`): their jobs stop as preempted ones do, checkpointing the
    step they are in, and the clusters wait, saying why; if the operator raises the budget they go
    back to the fleet's queue and their jobs resume. Returns the clusters stopped, as project/name.
    """
    at = time.time() if at is None else at
    stopped = []
    with _lock:
        with store.session() as s:
            over = [(q.project_id, q.gpu_type, q.gpu_hours) for q in s.scalars(sa.select(Quota).where(Quota.gpu_hours.is_not(None)))
                    if usage.gpu_seconds(s, q.project_id, q.gpu_type, at) / 3600 >= q.gpu_hours]
            victims = []
            for project_id, gpu_type, budget in over:
                name = s.get(Project, project_id).name
                for sc in s.scalars(sa.select(ServiceCluster).where(
                        ServiceCluster.project_id == project_id, ServiceCluster.gpu_type == gpu_type,
                        ServiceCluster.state.in_(("queued", "ready")))):
                    victims.append((sc.id, sc.name, sc.fleet_name, sc.gpu_type, name, budget))
        for sc_id, cluster, fleet_cluster, gpu_type, project, budget in victims:
            reason = (f"stopped: project {project!r} spent its {budget:g} {gpu_type} GPU-hour budget; "
                      f"its jobs resume from their checkpoints if the operator raises it")
            fleet_clusters.hold_cluster(store.fleet, fleet_cluster, reason)
            with store.session() as s:
                row = s.get(ServiceCluster, sc_id)
                row.state, row.reason = "held", reason
            stopped.append(f"{project}/{cluster}")
    return stopped


def tick(store: Store) -> None:
    """What the server does every few seconds without being asked: budgets, then the queues."""
    enforce_budgets(store)
    reconcile(store)
