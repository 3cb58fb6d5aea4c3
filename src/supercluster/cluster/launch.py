"""Starting a job's processes through the backend: on submit, and again after a preemption."""

from __future__ import annotations

from sqlalchemy.orm import Session

from supercluster.cluster.backends import JobSpec
from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.state import Cluster, Fleet, Job, on_rollback


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
    # A job the books never record would run unseen: cancel it if this transaction fails.
    on_rollback(s, lambda: backend.cancel(ref, job.job_dir))
    job.backend_ref = ref
