"""Starting a job's processes through the backend: on submit, and again after a preemption."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from supercluster.cluster.backends import JobSpec
from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.state import Cluster, Fleet, Job, on_rollback

STARTED = "backend_ref"  # in the job dir: what the backend calls the running job, until our books say it


def job_spec(job: Job, cluster: Cluster) -> JobSpec:
    return JobSpec(
        job_id=job.id, job_dir=job.job_dir, config=job.config, overrides=tuple(job.overrides),
        nodes=tuple(cluster.node_names), gpus_per_node=cluster.allocations[0].gpus,
        max_restarts=job.max_restarts, reservation=cluster.backend_ref, command=tuple(job.command or ()),
    )


def start_job(s: Session, fleet: Fleet, job: Job, cluster: Cluster) -> None:
    """Submits `job` on `cluster`'s nodes; the same job dir, so a restart resumes from its checkpoints."""
    backend = backend_for(fleet.backend, fleet.settings)
    ref = backend.submit(job_spec(job, cluster))
    # Written at once, outside the transaction: if this process dies before it commits, the next
    # `jobs.refresh` finds the runner here and takes it up instead of starting a second one.
    job_dir = Path(job.job_dir)
    (job_dir / STARTED).write_text(ref)

    def undo() -> None:  # a job the books never record would run unseen: cancel it if this transaction fails
        backend.cancel(ref, str(job_dir))
        (job_dir / STARTED).unlink(missing_ok=True)

    on_rollback(s, undo)
    job.backend_ref = ref


def started_ref(job: Job) -> str | None:
    """The runner `start_job` started for `job` that its books may not record yet."""
    try:
        return (Path(job.job_dir) / STARTED).read_text() or None
    except FileNotFoundError:
        return None


def forget_started(job: Job) -> None:
    """The job's runner was stopped: nothing in its dir may be taken up again."""
    (Path(job.job_dir) / STARTED).unlink(missing_ok=True)
