"""Jobs: one training run on a cluster, launched by the fleet's backend, followed to its end.

`refresh` is the reconcile step every job command runs first: it reads the backend's view of
nodes and jobs into our books, and when a job was requeued because a node failed (Slurm puts a
`--requeue` job back to pending), it swaps the cluster's failed nodes for replacements from the
fleet, moves the Slurm reservation onto them and releases the job, which resumes from its
latest checkpoint. After `max_restarts` requeues the job is cancelled and marked failed. It also
starts a job whose submit was cut off between writing it and starting it (see `submit_job`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from supercluster.cluster import preempt
from supercluster.cluster.backends import Backend
from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.isolation import JobArea, pin_paths
from supercluster.cluster.launch import start_job, started_ref
from supercluster.cluster.queue import eligible, sync_nodes
from supercluster.cluster.state import (
    JOB_ACTIVE,
    Allocation,
    Cluster,
    Database,
    Fleet,
    Job,
    Node,
    get_cluster,
    now,
    on_rollback,
    open_db,
)
from supercluster.cluster.usage import close_intervals, open_interval
from supercluster.errors import UserError
from supercluster.paths import home


def jobs_root() -> Path:
    return home() / "jobs"


class ClusterNotReady(UserError):
    """A job was submitted to a cluster that is not placed (queued or held)."""

    def __init__(self, name: str, state: str):
        super().__init__(f"Cluster {name!r} is still {state}; submit once `supercluster cluster show {name}` says ready.")
        self.state = state


def submit_job(
    db: Database | str | None, cluster_name: str, config: str, overrides: list[str] = (), *, max_restarts: int = 3,
    command: list[str] | None = None, area: JobArea | None = None, record: Callable[[Session, Job], None] | None = None,
) -> dict:
    """Start a training run of `config` on the cluster, or with `command` that argv instead on its
    first node (a serving job; `config` then names what it serves).

    `area`: where the job may read (default: anywhere, relative paths from the current folder);
    the config and every path in it are checked here, before anything starts.
    `record`: called with the session and the new job (its id known) in the transaction that
    writes it, before anything starts, so that the caller's own books commit with the fleet's or
    neither does; it may refuse by raising.

    Two steps: the job is written (its id then is never given out again), then started. If this
    process dies between them, the job is still in the books, pending, and `refresh` starts it
    (or takes up the runner the second step started), so no job runs unseen and none is lost.
    """
    db = open_db(db)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set {item!r} is not section.key=value; write it like train.steps=10.")
    overrides = list(overrides)
    if command is None:
        path = Path(config).resolve()
        if not path.is_file():
            raise UserError(f"Config file {config!r} does not exist; pass the path of a training TOML.")
        config = str(path)
        overrides = pin_paths(config, overrides, area or JobArea(base=Path.cwd()))
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be 0 or more, got {max_restarts}.")
    with db.transaction() as s:
        fleet = db.fleet(s)
        backend_for(fleet.backend, fleet.settings).check_runs_jobs()
        cluster = get_cluster(s, cluster_name)
        if cluster.state != "ready":
            raise ClusterNotReady(cluster_name, cluster.state)
        job = Job(cluster_name=cluster_name, config=config, overrides=list(overrides), command=command, state="pending",
                  job_dir="", restarts=0, max_restarts=max_restarts, preemptions=0, submitted_at=now())
        s.add(job)
        s.flush()
        jobs_root().mkdir(parents=True, exist_ok=True)
        # Unique even when several fleet databases share one $SUPERCLUSTER_HOME (ids restart per DB).
        job_dir = Path(tempfile.mkdtemp(prefix=f"job-{job.id}-", dir=jobs_root()))
        on_rollback(s, lambda: shutil.rmtree(job_dir, ignore_errors=True))
        job.job_dir = str(job_dir)
        if record is not None:
            record(s, job)
        job_id = job.id
    try:
        with db.transaction() as s:
            job = s.get(Job, job_id)
            _start_unstarted(s, db.fleet(s), job)
            return job_dict(job)
    except Exception as err:  # it never ran: say so in its row, which stays
        with db.transaction() as s:
            job = s.get(Job, job_id)
            if job.backend_ref is None:
                job.state, job.ended_at, job.detail = "failed", now(), f"could not start: {err}"
        raise


def _start_unstarted(s: Session, fleet: Fleet, job: Job) -> None:
    """Starts a pending job that never started on its ready cluster, or takes up the runner an
    interrupted start left (see `submit_job`). A job stopped with its cluster waits for it instead."""
    if job.state != "pending" or job.backend_ref is not None:
        return
    cluster = s.scalar(sa.select(Cluster).where(Cluster.name == job.cluster_name))
    if cluster is None or cluster.state != "ready":
        return
    ref = started_ref(job)
    if ref is not None:
        job.backend_ref = ref
    else:
        start_job(s, fleet, job, cluster)


def job_dict(j: Job) -> dict:
    return {
        "id": j.id, "cluster": j.cluster_name, "state": j.state, "config": j.config, "overrides": j.overrides,
        "command": j.command,
        "job_dir": j.job_dir, "run_dir": f"{j.job_dir}/run", "backend_ref": j.backend_ref, "restarts": j.restarts,
        "max_restarts": j.max_restarts, "preemptions": j.preemptions, "exit_code": j.exit_code, "cause": j.cause,
        "detail": preempt.describe(j.cause, j.cluster_name) if j.cause else j.detail,
        "submitted_at": j.submitted_at, "ended_at": j.ended_at,
    }


_ANY_ACTIVE = sa.select(Job.id).where(Job.state.in_(JOB_ACTIVE)).limit(1)  # built once: every delete asks


def refresh(db: Database | str | None = None) -> None:
    """Brings node and job states up to date with the backend, recovering requeued jobs."""
    db = open_db(db)
    with db.reading() as s:  # most calls find nothing to bring up to date, and need no write lock
        fleet = s.get(Fleet, 1)
        if fleet is None:
            return
        backend = backend_for(fleet.backend, fleet.settings)
        live = backend.node_states()
        if not live and s.scalar(_ANY_ACTIVE) is None:
            return
    with db.transaction() as s:
        fleet = s.get(Fleet, 1)
        if fleet is None:  # deleted since the look above
            return
        sync_nodes(s, fleet, live)
        # A job without a backend_ref was preempted and waits for its cluster: nothing runs to ask about.
        active = sa.select(Job).where(Job.state.in_(JOB_ACTIVE), Job.backend_ref.is_not(None)).order_by(Job.id)
        for job in s.scalars(active).all():
            _refresh_job(s, fleet, backend, job)
        # Jobs whose submit stopped between its two steps (a preempted job is left to its cluster).
        unstarted = (sa.select(Job).join(Cluster, Cluster.name == Job.cluster_name)
                     .where(Job.state == "pending", Job.backend_ref.is_(None), Cluster.state == "ready").order_by(Job.id))
        for job in s.scalars(unstarted).all():
            _start_unstarted(s, fleet, job)


def _refresh_job(s: Session, fleet: Fleet, backend: Backend, job: Job) -> None:
    status = backend.poll(job.backend_ref, job.job_dir)
    job.restarts = max(job.restarts, status.restarts)
    job.detail = status.detail
    if status.state == "pending" and status.restarts > 0:  # requeued after a failure
        if job.restarts > job.max_restarts:
            backend.cancel(job.backend_ref, job.job_dir)
            job.state, job.ended_at = "failed", now()
            job.detail = f"gave up after {job.max_restarts} restarts"
            return
        _replace_failed_nodes(s, fleet, backend, job)
    job.state = status.state
    job.exit_code = status.exit_code
    if status.state not in JOB_ACTIVE:
        job.ended_at = job.ended_at or now()


def _replace_failed_nodes(s: Session, fleet: Fleet, backend: Backend, job: Job) -> None:
    """Swaps the job's cluster's unusable nodes for free ones, nearest in the fabric first."""
    cluster = s.scalar(sa.select(Cluster).where(Cluster.name == job.cluster_name).options(selectinload(Cluster.allocations)))
    if cluster is None:
        return
    at = now()
    failed = [a for a in cluster.allocations if s.get(Node, a.node_name).state != "up"]
    if failed:
        before = [a.node_name for a in cluster.allocations]
        keep = [s.get(Node, a.node_name) for a in cluster.allocations if a not in failed]
        leaves, pods = {n.leaf for n in keep}, {n.pod for n in keep}
        spares = [
            n for n in s.scalars(sa.select(Node).where(Node.gpu_type == cluster.gpu_type).options(selectinload(Node.allocations)))
            if not n.allocations and eligible(n, cluster, at)
        ]
        # Same leaf switch as the healthy nodes, else same pod, else anywhere; then by name.
        spares.sort(key=lambda n: (n.leaf not in leaves, n.pod not in pods, n.name))
        if len(spares) < len(failed):
            job.detail = f"waiting for {len(failed) - len(spares)} replacement node(s)"
            return
        for old, new in zip(failed, spares):
            gpus = old.gpus
            s.delete(old)
            s.add(Allocation(cluster_id=cluster.id, node_name=new.name, gpus=gpus))
        s.flush()
        s.expire_all()
        cluster = s.get(Cluster, cluster.id)
        nodes = [s.get(Node, n) for n in cluster.node_names]
        cluster.leaves, cluster.pods = len({n.leaf for n in nodes}), len({n.pod for n in nodes})
        close_intervals(s, cluster.id, at, "nodes swapped")
        open_interval(s, cluster, cluster.node_names, cluster.gpus, at)
        if cluster.backend_ref:
            ref = cluster.backend_ref
            backend.update_reservation(ref, cluster.node_names)
            on_rollback(s, lambda: backend.update_reservation(ref, before))
        job.detail = f"requeued on {', '.join(cluster.node_names)}"
    backend.release_requeued(job.backend_ref)


def _get_job(s: Session, job_id: int) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise UserError(f"No job {job_id}; see `supercluster job list`.")
    return job


def job_status(db: Database | str | None, job_id: int) -> dict:
    db = open_db(db)
    refresh(db)
    with db.transaction(lock=False) as s:
        return job_dict(_get_job(s, job_id))


def list_jobs(db: Database | str | None = None, cluster: str | None = None) -> list[dict]:
    db = open_db(db)
    refresh(db)
    with db.transaction(lock=False) as s:
        query = sa.select(Job).order_by(Job.id)
        if cluster:
            query = query.where(Job.cluster_name == cluster)
        return [job_dict(j) for j in s.scalars(query)]


def cancel_in_session(s: Session, fleet: Fleet, job: Job) -> None:
    # Not undone on rollback (a cancelled job cannot be restarted as it was); the books then
    # still say running, and the next `refresh` reads the cancellation from the backend.
    if job.backend_ref is not None:  # None: preempted, nothing runs
        backend_for(fleet.backend, fleet.settings).cancel(job.backend_ref, job.job_dir)
    job.state, job.ended_at = "cancelled", now()


def cancel_job(db: Database | str | None, job_id: int) -> dict:
    db = open_db(db)
    refresh(db)
    with db.transaction() as s:
        job = _get_job(s, job_id)
        if job.state not in JOB_ACTIVE:
            raise UserError(f"Job {job_id} already ended ({job.state}); nothing to cancel.")
        cancel_in_session(s, db.fleet(s), job)
        return job_dict(job)


def log_path(db: Database | str | None, job_id: int) -> Path:
    db = open_db(db)
    with db.transaction(lock=False) as s:
        job = _get_job(s, job_id)
        return Path(backend_for(db.fleet(s).backend, db.fleet(s).settings).log_path(job.backend_ref, job.job_dir))


def wait_job(db: Database | str | None, job_id: int, timeout_s: float = 600.0, poll_s: float = 2.0) -> dict:
    """Refreshes until the job ends (recovering it on node failure on the way); returns its final state."""
    db = open_db(db)
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(db, job_id)
        if status["state"] not in JOB_ACTIVE or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
