"""A project's clusters, jobs and quota, carried out by `supercluster.cluster`.

Cluster names are global in the fleet, so a project's cluster `train` lives there as
`p<project id>.<name>`. Quotas are per project and GPU type: past `max_gpus` concurrent GPUs a
request waits here (state `waiting`, with the reason) until the project's own clusters free
enough; past the `gpu_hours` budget a new request is refused. A cluster holds GPUs, and is
charged, from the moment the fleet places it until it is deleted (one usage interval).

One cluster state, the fleet's: a service cluster is `waiting` while the fleet has no cluster of
its fleet name (the quota holds it back), else whatever the fleet says (`held`, stopped for its
budget, shows as waiting), read in the same session as the service's row. A call into `cluster`
opens its own transaction; the service's rows it touches (a cluster's, a job's) are written by
its hook inside that transaction, after the quota is decided there, under the fleet's lock: so
the two books never disagree, and no lock of this process is needed to keep requests apart.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster import clusters as fleet_clusters
from supercluster.cluster import jobs as fleet_jobs
from supercluster.cluster import preempt
from supercluster.cluster.backends import canonical_gpu_type
from supercluster.cluster.isolation import JobArea, PathRefused
from supercluster.cluster.state import Cluster, Job, Node, plain
from supercluster.errors import UserError
from supercluster.paths import data_library, model_library, project_area
from supercluster.service import usage
from supercluster.service.auth import Caller, ServiceError
from supercluster.service.models import Project, Quota, ServiceCluster, ServiceJob
from supercluster.service.store import Store
from supercluster.service.tenancy import visible_project


def fleet_name(project: Project, name: str) -> str:
    return f"p{project.id}.{name}"


def cluster_namer(s: Session, fleet_names: Iterable[str | None]) -> Callable[[str], str]:
    """How the service words the fleet clusters of a cause (`preempt.describe`): as `project/name`."""
    wanted = {n for n in fleet_names if n}
    rows = s.execute(sa.select(ServiceCluster.fleet_name, Project.name, ServiceCluster.name)
                     .join(Project, Project.id == ServiceCluster.project_id)
                     .where(ServiceCluster.fleet_name.in_(wanted))).all() if wanted else []
    labels = {f: f"{project}/{name}" for f, project, name in rows}
    return lambda n: f"cluster {labels[n]!r}" if n in labels else "another cluster"  # the operator's, or one gone


def cluster_state(fleet_state: str | None) -> str:
    """The state a tenant sees: the fleet's, `waiting` while the fleet has none (the quota holds
    it back) or holds it (its budget is spent)."""
    return "waiting" if fleet_state in (None, "held") else fleet_state


def _fleet_state(s: Session, sc: ServiceCluster) -> str | None:
    return s.scalar(sa.select(Cluster.state).where(Cluster.name == sc.fleet_name))


def cluster_view(sc: ServiceCluster, project: str, fleet: dict | None, name: Callable[[str], str]) -> dict:
    """The fleet's state and why it waits (a preemption, a budget hold), or the quota's while it waits here."""
    view = {"name": sc.name, "project": project, "state": "waiting", "reason": sc.reason, "priority": sc.priority,
            "gpus": sc.gpus, "gpu_type": sc.gpu_type, "created_at": sc.created_at, "nodes": [], "leaves": None,
            "pods": None, "queue_position": None, "placed_at": None, "jobs": []}
    if fleet is not None:
        view.update({k: fleet[k] for k in ("leaves", "pods", "queue_position", "placed_at", "jobs")})
        view["nodes"] = [{k: n[k] for k in ("name", "gpus", "leaf", "pod", "status")} for n in fleet["nodes"]]
        view["state"] = cluster_state(fleet["state"])
        if fleet["state"] == "ready":
            view["reason"] = None
        elif fleet["cause"]:
            view["reason"] = preempt.describe(fleet["cause"], name=name)
        else:
            view["reason"] = fleet["detail"] or "waiting for free nodes in the fleet"
    return view


def _views(s: Session, scs: list, project: str, fleet_rows: list | None = None, project_id: int | None = None) -> list[dict]:
    """`cluster_view` of each of `scs` (rows of one project), from one read of the fleet;
    `fleet_rows`: the fleet's rows of those clusters, when the caller read them already, and
    `project_id` when they are all of the project's (`_PROJECT_FLEET_IDS` then names them)."""
    scs = plain(scs)
    if fleet_rows is None:
        fleet = fleet_clusters.show_clusters_in(s, [sc.fleet_name for sc in scs])
    elif project_id is not None:
        fleet = {d["name"]: d for d in fleet_clusters.cluster_dicts(s, fleet_rows, _PROJECT_FLEET_IDS, {"project_id": project_id})}
    else:
        fleet = {d["name"]: d for d in fleet_clusters.cluster_dicts(s, fleet_rows)}
    name = cluster_namer(s, [(f["cause"] or {}).get("by") for f in fleet.values()])
    return [cluster_view(sc, project, fleet.get(sc.fleet_name), name) for sc in scs]


# ---- quota ---------------------------------------------------------------------------------------


# The statements the busiest routes run, built once with their parameters named: building a
# statement cost several times running it (a create, a delete or a quota view ran several each).
_PROJECT_ID = sa.bindparam("project_id")
_IN_USE = (sa.select(ServiceCluster.gpu_type, sa.func.sum(ServiceCluster.gpus))
           .join(Cluster, Cluster.name == ServiceCluster.fleet_name)
           .where(ServiceCluster.project_id == _PROJECT_ID, Cluster.state.in_(("queued", "ready")))
           .group_by(ServiceCluster.gpu_type))
_QUOTAS = (sa.select(Quota.gpu_type, Quota.max_gpus, Quota.gpu_hours, Quota.max_priority)
           .where(Quota.project_id == _PROJECT_ID))
_TYPES_ASKED = sa.select(ServiceCluster.gpu_type).distinct().where(ServiceCluster.project_id == _PROJECT_ID)
_NAMED = (ServiceCluster.project_id == _PROJECT_ID) & (ServiceCluster.name == sa.bindparam("name"))
_TAKEN = sa.select(ServiceCluster.id).where(_NAMED)
_ROW = sa.select(ServiceCluster).where(_NAMED)
# A delete's look: the service's row and whether the fleet has its cluster.
_ON_FLEET = (sa.select(ServiceCluster.id, ServiceCluster.fleet_name, Cluster.id.label("on_fleet"))
             .outerjoin(Cluster, Cluster.name == ServiceCluster.fleet_name).where(_NAMED))
_FLEET_HAS = sa.select(Cluster.id).where(Cluster.name == sa.bindparam("fleet_name"))
_FORGET = sa.delete(ServiceCluster).where(ServiceCluster.id == sa.bindparam("id"))
_LIST = sa.select(*ServiceCluster.__table__.c).where(ServiceCluster.project_id == _PROJECT_ID).order_by(ServiceCluster.id)
_GPU_TYPES = sa.select(Node.gpu_type).distinct()
_FLEET_LIST = (sa.select(*Cluster.__table__.c).join(ServiceCluster, ServiceCluster.fleet_name == Cluster.name)
               .where(ServiceCluster.project_id == _PROJECT_ID).order_by(Cluster.id))
_PROJECT_FLEET_IDS = (sa.select(Cluster.id).join(ServiceCluster, ServiceCluster.fleet_name == Cluster.name)
                      .where(ServiceCluster.project_id == _PROJECT_ID))


def _in_use_by_type(s: Session, project_id: int) -> dict[str, int]:
    """GPUs the project has handed to the fleet (queued there or placed), by type, as the fleet says."""
    return dict(s.execute(_IN_USE, {"project_id": project_id}).all())


def _in_use(s: Session, project_id: int, gpu_type: str) -> int:
    return int(_in_use_by_type(s, project_id).get(gpu_type, 0))


def quota_view(s: Session, project: Project) -> dict:
    """The project's quota and use per GPU type: a few queries, each summed by the database, whatever the types."""
    quotas = {q.gpu_type: q for q in s.execute(_QUOTAS, {"project_id": project.id})}  # plain rows
    held = _in_use_by_type(s, project.id)
    spent = usage.gpu_seconds_by_type(s, project.id)
    types = quotas.keys() | set(s.scalars(_TYPES_ASKED, {"project_id": project.id}))
    rows = []
    for gpu_type in sorted(types):
        q = quotas.get(gpu_type)
        rows.append({"gpu_type": gpu_type, "max_gpus": q.max_gpus if q else None, "gpu_hours": q.gpu_hours if q else None,
                     "max_priority": q.max_priority if q else 0, "used_gpus": int(held.get(gpu_type, 0)),
                     "used_gpu_hours": spent.get(gpu_type, 0.0) / 3600})
    return {"project": project.name, "quotas": rows}


def set_quota(s: Session, project: Project, gpu_type: str, max_gpus: int | None, gpu_hours: float | None,
              max_priority: int = 0) -> None:
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


def _gpu_type(name: str) -> str:
    try:
        return canonical_gpu_type(name)
    except UserError as err:
        raise ServiceError(422, str(err)) from None


def _resolve_gpu_type(s: Session, gpu_type: str | None) -> str:
    types = sorted(set(s.scalars(_GPU_TYPES)))
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


_QUOTA = sa.select(Quota.max_gpus, Quota.gpu_hours).where(Quota.project_id == sa.bindparam("project_id"),
                                                         Quota.gpu_type == sa.bindparam("gpu_type"))


def _quota_decision(s: Session, project: Project, gpu_type: str, gpus: int) -> str | None:
    """None when the request may go to the fleet now, else why it waits; raises when it never may."""
    q = s.execute(_QUOTA, {"project_id": project.id, "gpu_type": gpu_type}).first()  # a plain row: read on every create
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


class _Waits(Exception):
    """Raised by a hook in a fleet transaction: the quota says wait, so the fleet does nothing."""

    def __init__(self, reason: str | None):
        self.reason = reason


def _admit(s: Session, sc: ServiceCluster, project: Project | None = None) -> None:
    """In the fleet's transaction, under its lock: may `sc` go to the fleet now? Raises `_Waits`
    with the quota's reason if not, ServiceError if it never may. `project`: sc's, when the caller
    has it (a project is never renamed or deleted, so one read before the transaction holds)."""
    reason = _quota_decision(s, project or s.get(Project, sc.project_id), sc.gpu_type, sc.gpus)
    if reason is not None:
        raise _Waits(reason)
    sc.reason = None


def _name_taken(s: Session, project_id: int, name: str) -> bool:
    return s.scalar(_TAKEN, {"project_id": project_id, "name": name}) is not None


def _taken(project: str, name: str) -> ServiceError:
    return ServiceError(409, f"Project {project!r} already has a cluster named {name!r}; choose another name or delete it first.")


def _fleet_create(store: Store, sc: ServiceCluster, record: Callable[[Session], None]) -> dict:
    """Hands the cluster to the fleet, which places it, queues it or preempts lower priorities for it."""
    try:
        return fleet_clusters.create_cluster(store.fleet, sc.fleet_name, sc.gpus, gpu_type=sc.gpu_type, wait=True,
                                             max_switches=sc.max_switches, require_health=sc.require_health,
                                             owner=usage.owner_tag(sc.project_id, sc.user_id), priority=sc.priority,
                                             record=record)
    except fleet_clusters.NameTaken:
        raise
    except UserError as err:
        raise ServiceError(422, str(err)) from None


def create_cluster(store: Store, caller: Caller, project: str, name: str, gpus: int, gpu_type: str | None,
                   max_switches: int | None, require_health: bool, priority: int = 0) -> dict:
    with store.reading() as s:
        p = visible_project(s, caller, project, "member")
        if _name_taken(s, p.id, name):
            raise _taken(project, name)
        gpu_type = _resolve_gpu_type(s, gpu_type)
        if priority:
            q = s.get(Quota, (p.id, gpu_type))
            allowed = q.max_priority if q else 0
            if priority > allowed:
                raise ServiceError(403, f"Project {project!r} may ask for priority up to {allowed} on {gpu_type}; ask the operator to raise it.")
    sc = ServiceCluster(project_id=p.id, user_id=caller.user_id, name=name, fleet_name=fleet_name(p, name), gpus=gpus,
                        gpu_type=gpu_type, max_switches=max_switches, require_health=require_health,
                        priority=priority, created_at=time.time())

    def record(s: Session) -> None:  # in the fleet's transaction: both rows or neither
        if _name_taken(s, p.id, name):  # a request beside this one took it
            raise _taken(project, name)
        _admit(s, sc, p)
        s.add(sc)

    try:
        fleet = _fleet_create(store, sc, record)  # refuses sizes that never fit: nothing kept on either side
    except fleet_clusters.NameTaken:  # a request beside this one took it before ours reached the hook
        raise _taken(project, name) from None
    except _Waits as waits:
        with store.fleet.transaction() as s:  # the fleet's lock: a request beside this one sees it, or it sees theirs
            if _name_taken(s, p.id, name):
                raise _taken(project, name) from None
            sc.reason = waits.reason
            s.add(sc)
        fleet = None
    with store.reading() as s:
        name_of = cluster_namer(s, [((fleet or {}).get("cause") or {}).get("by")])
        return cluster_view(sc, project, fleet, name_of)


def undrain_node(store: Store, node: str) -> list[str]:
    """Returns a drained node to service; the clusters that started on it, as `project/name`."""
    from supercluster.cluster.fleet import resume_node

    started = resume_node(node, db=store.fleet, only_if_out=True)  # places them in its own transaction
    with store.reading() as s:
        labels = dict(s.execute(sa.select(ServiceCluster.fleet_name, Project.name + "/" + ServiceCluster.name)
                                .join(Project, Project.id == ServiceCluster.project_id)
                                .where(ServiceCluster.fleet_name.in_(started))).all()) if started else {}
    return [labels.get(c, c) for c in started]  # the operator's own clusters keep their fleet names


def reconcile(store: Store) -> None:
    """Hands the fleet the clusters the quota held back, and gives back those a budget stopped,
    once the quota allows (each decided again in the fleet's transaction that does it).

    Run where the quota can newly allow one: after a delete frees GPUs, after the operator sets a
    quota, and on the server's pass (a budget's hold). Never on a read: a read changes nothing the
    quota decides on, and the fleet's own queue places what it queued without the service."""
    with store.reading() as s:  # the common case, nothing waits: one cheap query (of plain rows, read by attribute)
        waiting = s.execute(_WAITING).all()
        # A first look without the fleet's lock: most that wait still must, and need not take it.
        decided = [(sc, sc.fleet_state, _quota_reason(s, sc)) for sc in waiting]
    for sc, state, reason in decided:
        if state == "held":
            if reason is None:
                _give_back(store, sc.id, sc.fleet_name)
        else:
            _hand_over(store, sc, reason)


_WAITING = (sa.select(*ServiceCluster.__table__.c, Cluster.state.label("fleet_state"))
            .outerjoin(Cluster, Cluster.name == ServiceCluster.fleet_name)
            .where(sa.or_(Cluster.id.is_(None), Cluster.state == "held"))
            .order_by(ServiceCluster.id))


def _quota_reason(s: Session, sc: ServiceCluster) -> str | None:
    """Why the quota holds `sc` back now (a wait or a spent budget), or None."""
    try:
        return _quota_decision(s, s.get(Project, sc.project_id), sc.gpu_type, sc.gpus)
    except ServiceError as err:
        return err.message


def _give_back(store: Store, sc_id: int, fleet_cluster: str) -> None:
    def record(s: Session) -> None:
        sc = s.get(ServiceCluster, sc_id)
        if sc is not None:  # None: it is being deleted
            _admit(s, sc)

    try:
        fleet_clusters.release_cluster(store.fleet, fleet_cluster, record=record)
    except (_Waits, ServiceError, UserError):
        pass  # still over its quota or budget (the hold says why), or deleted meanwhile


def _hand_over(store: Store, sc: ServiceCluster, reason: str | None) -> None:
    """Hands a waiting cluster to the fleet if the quota allows, else keeps why it waits."""
    if reason is None:
        def record(s: Session) -> None:
            row = s.get(ServiceCluster, sc.id)
            if row is None:  # deleted meanwhile
                raise _Waits(None)
            _admit(s, row)

        try:
            _fleet_create(store, sc, record)
            return
        except fleet_clusters.NameTaken:
            return  # handed over beside this pass
        except _Waits as waits:
            reason = waits.reason
        except ServiceError as err:  # the fleet refuses its size now
            reason = err.message
    if reason is None or reason == sc.reason:
        return  # written only when it changes: most passes find the same reason, and need not take the write lock
    with store.fleet.transaction() as s:
        s.execute(sa.update(ServiceCluster).where(ServiceCluster.id == sc.id,
                                                  ServiceCluster.fleet_name.not_in(sa.select(Cluster.name)))
                  .values(reason=reason))


def _get(s: Session, p: Project, name: str) -> ServiceCluster:
    sc = s.scalar(_ROW, {"project_id": p.id, "name": name})
    if sc is None:
        raise ServiceError(404, f"Project {p.name!r} has no cluster named {name!r}.")
    return sc


def show_cluster(store: Store, caller: Caller, project: str, name: str) -> dict:
    with store.reading() as s:  # one snapshot of both the service's tables and the fleet's
        return _views(s, [_get(s, visible_project(s, caller, project), name)], project)[0]


def list_clusters(store: Store, caller: Caller, project: str) -> list[dict]:
    with store.reading() as s:  # one snapshot of both the service's tables and the fleet's
        p = visible_project(s, caller, project)
        # Plain rows (read by attribute, as the ORM's objects are): a project may hold hundreds.
        # The fleet's rows of the project's clusters by a join, not by a list of hundreds of names.
        # Through the connection: the session's handling of a result costs more than its rows.
        conn = s.connection()
        return _views(s, conn.execute(_LIST, {"project_id": p.id}).all(), project,
                      conn.execute(_FLEET_LIST, {"project_id": p.id}).all(), project_id=p.id)


def delete_cluster(store: Store, caller: Caller, project: str, name: str, force: bool) -> dict:
    with store.reading() as s:
        p = visible_project(s, caller, project, "member")
        # The service's row and whether the fleet has its cluster, in one read.
        sc = s.execute(_ON_FLEET, {"project_id": p.id, "name": name}).first()
        if sc is None:
            raise ServiceError(404, f"Project {p.name!r} has no cluster named {name!r}.")

    def forget(s: Session) -> None:  # the service's row
        s.execute(_FORGET, {"id": sc.id})

    # A cluster on the fleet stays there until deleted, so this snapshot's "on the fleet" holds (a
    # delete beside this one makes the fleet's delete below refuse, as it did); one that waits in
    # the service may be handed over meanwhile, so that is decided again under the fleet's lock.
    on_fleet = sc.on_fleet is not None
    if not on_fleet:
        with store.fleet.transaction() as s:  # the fleet's lock: no reconcile hands it over meanwhile
            on_fleet = s.scalar(_FLEET_HAS, {"fleet_name": sc.fleet_name}) is not None
            if not on_fleet:
                forget(s)
    if on_fleet:
        try:  # the service's row goes in the fleet's transaction: both or neither
            fleet_clusters.delete_cluster(store.fleet, sc.fleet_name, force=force, record=forget)
        except UserError as err:
            raise ServiceError(409, str(err).replace("--force", "?force=true")) from None
    reconcile(store)
    return {"name": name, "project": project, "state": "deleted"}


# ---- jobs ----------------------------------------------------------------------------------------


def _configs_dir() -> Path:
    from supercluster.hardware.local import home

    return home() / "service" / "configs"


def job_view(job: dict, cluster: str, name: Callable[[str], str]) -> dict:
    """The fleet's job; `detail` says why a preempted one waits (it restarts from its checkpoint),
    naming clusters with `name` (`cluster_namer`)."""
    keep = ("id", "state", "overrides", "restarts", "max_restarts", "preemptions", "exit_code", "detail", "submitted_at", "ended_at")
    view = {**{k: job[k] for k in keep}, "cluster": cluster}
    if job["cause"]:
        view["detail"] = preempt.describe(job["cause"], job["cluster"], name)
    return view


def _namer_for_jobs(store: Store, jobs: list[dict]) -> Callable[[str], str]:
    with store.reading() as s:
        return cluster_namer(s, [n for j in jobs if j["cause"] for n in (j["cause"].get("by"), j["cluster"])])


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

    with store.reading() as s:  # the fleet's state, read beside the service's row
        p = visible_project(s, caller, project, "member")
        sc = _get(s, p, cluster)
        state = cluster_state(_fleet_state(s, sc))
    if state != "ready":
        raise _not_ready(cluster, state, "submit")
    path = _configs_dir() / f"{uuid.uuid4().hex}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text(tomli_w.dumps(config))
    except (TypeError, ValueError) as err:
        raise ServiceError(422, f"The config cannot be written as TOML ({err}); send sections of plain values.") from None

    def record(s: Session, job: Job) -> None:  # in the fleet's transaction that writes the job: both rows or neither
        s.add(ServiceJob(job_id=job.id, project_id=p.id, user_id=caller.user_id, cluster=cluster, created_at=time.time()))

    try:
        job = fleet_jobs.submit_job(store.fleet, sc.fleet_name, str(path), overrides, max_restarts=max_restarts,
                                    area=job_area(store, p), record=record)
    except fleet_jobs.ClusterNotReady as err:  # the fleet queued or held it since we looked
        path.unlink(missing_ok=True)
        raise _not_ready(cluster, cluster_state(err.state), "submit") from None
    except UserError as err:
        path.unlink(missing_ok=True)
        raise ServiceError(403 if isinstance(err, PathRefused) else 422, str(err)) from None
    return job_view(job, cluster, str)  # a new job has no cause to word


def _not_ready(cluster: str, state: str, what: str) -> ServiceError:
    return ServiceError(409, f"Cluster {cluster!r} is {state}; {what} once it is ready.")


def _job(store: Store, caller: Caller, project: str, job_id: int, role: str = "viewer") -> ServiceJob:
    with store.reading() as s:
        p = visible_project(s, caller, project, role)
        sj = s.get(ServiceJob, job_id)
        if sj is None or sj.project_id != p.id:
            raise ServiceError(404, f"Project {project!r} has no job {job_id}.")
        return sj


def job_status(store: Store, caller: Caller, project: str, job_id: int) -> dict:
    sj = _job(store, caller, project, job_id)
    job = fleet_jobs.job_status(store.fleet, job_id)
    return job_view(job, sj.cluster, _namer_for_jobs(store, [job]))


def list_jobs(store: Store, caller: Caller, project: str) -> list[dict]:
    with store.reading() as s:
        p = visible_project(s, caller, project)
        mine = {sj.job_id: sj for sj in s.scalars(sa.select(ServiceJob).where(ServiceJob.project_id == p.id))}
    if not mine:
        return []
    jobs = [j for j in fleet_jobs.list_jobs(store.fleet) if j["id"] in mine]
    name = _namer_for_jobs(store, jobs)
    return [job_view(j, mine[j["id"]].cluster, name) for j in jobs]


def cancel_job(store: Store, caller: Caller, project: str, job_id: int) -> dict:
    sj = _job(store, caller, project, job_id, "member")
    try:
        job = fleet_jobs.cancel_job(store.fleet, job_id)
    except UserError as err:
        raise ServiceError(409, str(err)) from None
    return job_view(job, sj.cluster, _namer_for_jobs(store, [job]))


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
    with store.reading() as s:
        over = [(q.project_id, q.gpu_type, q.gpu_hours) for q in s.scalars(sa.select(Quota).where(Quota.gpu_hours.is_not(None)))
                if usage.gpu_seconds(s, q.project_id, q.gpu_type, at) / 3600 >= q.gpu_hours]
        victims = []
        for project_id, gpu_type, budget in over:
            project = s.get(Project, project_id).name
            on_fleet = (sa.select(ServiceCluster.name, ServiceCluster.fleet_name)
                        .join(Cluster, Cluster.name == ServiceCluster.fleet_name)
                        .where(ServiceCluster.project_id == project_id, ServiceCluster.gpu_type == gpu_type,
                               Cluster.state.in_(("queued", "ready"))))
            victims += [(cluster, fleet_cluster, gpu_type, project, budget) for cluster, fleet_cluster in s.execute(on_fleet)]
    stopped = []
    for cluster, fleet_cluster, gpu_type, project, budget in victims:
        reason = (f"stopped: project {project!r} spent its {budget:g} {gpu_type} GPU-hour budget; "
                  f"its jobs resume from their checkpoints if the operator raises it")
        try:
            fleet_clusters.hold_cluster(store.fleet, fleet_cluster, reason)
        except UserError:
            continue  # deleted since we looked
        stopped.append(f"{project}/{cluster}")
    return stopped


def tick(store: Store) -> None:
    """What the server does every few seconds without being asked: budgets, then the queues."""
    enforce_budgets(store)
    reconcile(store)
