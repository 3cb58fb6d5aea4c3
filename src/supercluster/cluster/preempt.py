"""Preemption: a waiting request of higher priority reclaims nodes from clusters of lower priority.

As Kueue and Slurm's QOS preemption do: when a queued cluster does not fit, the clusters of
lower priority on its GPU type are candidates, lowest priority first and, within one priority,
the youngest (least work lost) first. Candidates are added until the request would fit on what
they hold plus what is free, then any that turn out not to be needed are dropped again, so the
set is small. Each victim's running jobs are stopped through the backend and go back to
pending; the victim returns to the queue (at its old place, ahead of later requests), and when
it is placed again its jobs are submitted again in the same job dir and resume from their
latest checkpoint.
"""

from __future__ import annotations

from typing import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.launch import forget_started
from supercluster.cluster.state import JOB_ACTIVE, Allocation, Cluster, Fleet, Job, now
from supercluster.cluster.usage import close_intervals


_LOWER = (sa.select(Cluster.id).where(Cluster.state == "ready", Cluster.gpu_type == sa.bindparam("gpu_type"),
                                      Cluster.priority < sa.bindparam("priority")).limit(1))  # built once


def candidates(s: Session, cluster) -> list[Cluster]:
    """Placed clusters of the same GPU type and lower priority, in the order they are taken.
    `cluster`: a `Cluster` or a row of its table."""
    # A request that does not fit asks this on every create and delete of a full fleet, and most
    # find none (all at one priority): a plain row answers that for a fraction of loading objects.
    s.flush()  # the connection does not autoflush
    if s.connection().execute(_LOWER, {"gpu_type": cluster.gpu_type, "priority": cluster.priority}).first() is None:
        return []
    return list(s.scalars(
        sa.select(Cluster)
        .where(Cluster.state == "ready", Cluster.gpu_type == cluster.gpu_type, Cluster.priority < cluster.priority)
        .order_by(Cluster.priority, Cluster.placed_at.desc(), Cluster.id.desc())
    ))


def choose_victims(pool: list[Cluster], fits: Callable[[set[int]], bool]) -> list[Cluster] | None:
    """The clusters of `pool` (in order) to preempt so that `fits(their ids)`; None if all are not enough."""
    victims: list[Cluster] = []
    for c in pool:
        victims.append(c)
        if fits({v.id for v in victims}):
            break
    else:
        return None
    # Greedy order can take one that a later, larger one made unnecessary: drop those.
    for v in reversed(victims[:-1]):
        rest = [x for x in victims if x is not v]
        if fits({x.id for x in rest}):
            victims = rest
    return victims


def preempt(s: Session, fleet: Fleet, victims: Iterable[Cluster], by: Cluster) -> None:
    """Stops the victims' jobs, frees their nodes and queues them again, with the cause recorded."""
    for victim in victims:
        stop(s, fleet, victim, {"code": "preempted", "by": by.name, "priority": by.priority, "over": victim.priority})


def cluster_named(name: str) -> str:
    return f"cluster {name!r}"


def describe(cause: dict, cluster: str | None = None, name: Callable[[str], str] = cluster_named) -> str:
    """The words for a cause (`{"code": "preempted", "by": cluster, "priority": p, "over": q}` or
    `{"code": "held", "note": why}`); with `cluster`, a stopped job's, saying when it restarts.
    `name` words a fleet cluster's name: a caller with names of its own (the service) passes its own."""
    if cause["code"] == "preempted":
        text = f"preempted by {name(cause['by'])} (priority {cause['priority']} over {cause['over']})"
    else:
        text = cause["note"]
    if cluster is not None:
        text += f"; restarts from its latest checkpoint when {name(cluster)} is placed again"
    return text


def stop(s: Session, fleet: Fleet, victim: Cluster, cause: dict, state: str = "queued", end_reason: str = "preempted") -> None:
    """Stops a placed cluster's jobs (back to pending, restarted in their job dirs when it is placed
    again), frees its nodes, closes its usage interval and leaves it in `state` with the `cause`
    (structured, so that whoever shows it can name the clusters in it its own way: `describe`)."""
    backend = backend_for(fleet.backend, fleet.settings)
    at = now()
    # Not undone on rollback, like a cancel: a stopped job cannot be put back as it ran.
    active = s.scalars(sa.select(Job).where(Job.cluster_name == victim.name, Job.state.in_(JOB_ACTIVE),
                                            Job.backend_ref.is_not(None)))
    for job in active.all():
        backend.preempt(job.backend_ref, job.job_dir)
        forget_started(job)
        job.state, job.backend_ref, job.exit_code = "pending", None, None
        job.preemptions += 1
        job.cause, job.detail = cause, None
    if victim.backend_ref:
        backend.release(victim.backend_ref)
    if victim.state == "ready":
        close_intervals(s, victim.id, at, end_reason)
    s.execute(sa.delete(Allocation).where(Allocation.cluster_id == victim.id))
    s.expire(victim, ["allocations"])
    victim.state, victim.placed_at, victim.backend_ref = state, None, None
    victim.leaves = victim.pods = None
    victim.bypassed, victim.cause, victim.detail = 0, cause, None
