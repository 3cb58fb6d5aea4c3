"""The queue of clusters waiting for nodes, and the placing of them (the health gate included).

Highest priority first, then FIFO, with backfill; a request that does not fit may preempt
clusters of lower priority (`preempt`). Backfill: when the oldest waiting request does not
fit, later ones that fit start anyway, but each time that happens the waiting request counts it, and after `BACKFILL_LIMIT`
such bypasses nothing behind it starts until it does (clusters have no end time to plan a
reservation around, so this bounds starvation instead). Called inside the caller's fleet
transaction whenever nodes may have been freed or added.
"""

from __future__ import annotations


import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster import placement, preempt
from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.launch import start_job
from supercluster.cluster.state import Allocation, Cluster, Fleet, Job, Node, now, on_rollback
from supercluster.cluster.usage import open_interval

BACKFILL_LIMIT = 8


def eligible(node, cluster: Cluster, at: float) -> bool:
    """The health gate: up, and either never checked (unless required) or passed recently."""
    if node.state != "up":
        return False
    if node.last_health_status is None:
        return not cluster.require_health
    return node.last_health_status == "passed" and at - (node.last_health_at or 0) <= cluster.health_max_age_s


def eligible_sql(cluster: Cluster, at: float) -> sa.ColumnElement[bool]:
    """`eligible` as a WHERE clause, so that the database filters the fleet instead of Python."""
    fresh = sa.and_(Node.last_health_status == "passed", Node.last_health_at >= at - cluster.health_max_age_s)
    checked_or_not = fresh if cluster.require_health else sa.or_(Node.last_health_status.is_(None), fresh)
    return sa.and_(Node.state == "up", checked_or_not)


def used_gpus_per_node(ignoring: set[int] = frozenset()) -> sa.Subquery:
    query = sa.select(Allocation.node_name, sa.func.sum(Allocation.gpus).label("used"))
    if ignoring:
        query = query.where(Allocation.cluster_id.not_in(ignoring))
    return query.group_by(Allocation.node_name).subquery()


def type_geometry(s: Session, gpu_type: str) -> tuple[int, int, int]:
    """GPUs per node, the most nodes under one leaf switch, and all GPUs of a type (one query)."""
    per_leaf = sa.func.count().over(partition_by=Node.leaf)
    rows = sa.select(Node.gpus, per_leaf.label("per_leaf")).where(Node.gpu_type == gpu_type).subquery()
    return tuple(s.execute(sa.select(sa.func.max(rows.c.gpus), sa.func.max(rows.c.per_leaf), sa.func.sum(rows.c.gpus))).one())


def free_capacity(s: Session, cluster: Cluster, node_gpus: int, at: float, ignoring: set[int] = frozenset()) -> list[placement.Free]:
    """The eligible nodes that could hold part of `cluster`, as `placement.Free` tuples.

    Placement runs on every create over the whole fleet, so the database does the filtering
    (health gate, and whole free nodes for a request of whole nodes) and the rows come back as
    plain tuples on the session's connection, without the ORM's per-row bookkeeping.
    ignoring: clusters whose allocations count as free (to ask what preempting them would give).
    """
    s.flush()  # the connection does not autoflush: pending node or allocation changes must count
    used = used_gpus_per_node(ignoring)
    free = Node.gpus - sa.func.coalesce(used.c.used, 0)
    fits = used.c.used.is_(None) if cluster.gpus >= node_gpus else free >= cluster.gpus
    query = (
        sa.select(Node.name, Node.leaf, Node.pod, free, Node.gpus)
        .outerjoin(used, used.c.node_name == Node.name)
        .where(Node.gpu_type == cluster.gpu_type, eligible_sql(cluster, at), fits)
        .order_by(Node.name)
    )
    return list(map(placement.Free._make, s.connection().execute(query).all()))


def _try_place(s: Session, fleet: Fleet, cluster: Cluster) -> bool:
    node_gpus = s.scalar(sa.select(sa.func.max(Node.gpus)).where(Node.gpu_type == cluster.gpu_type))
    at = now()

    def find(ignoring: set[int] = frozenset()) -> placement.Placement | None:
        return placement.place(free_capacity(s, cluster, node_gpus, at, ignoring), cluster.gpus, node_gpus, cluster.max_switches)

    found = find()
    if found is None:
        pool = preempt.candidates(s, cluster)
        victims = preempt.choose_victims(pool, lambda ids: find(ids) is not None) if pool else None
        if victims:
            preempt.preempt(s, fleet, victims, by=cluster)
            found = find()
    if found is None:
        return False
    # One multi-row INSERT instead of an ORM object per node.
    s.connection().execute(sa.insert(Allocation), [{"cluster_id": cluster.id, "node_name": name, "gpus": gpus}
                                                   for name, gpus in found.nodes])
    s.expire(cluster, ["allocations"])
    cluster.state, cluster.placed_at, cluster.detail = "ready", now(), None
    open_interval(s, cluster, [n for n, _ in found.nodes], cluster.gpus, cluster.placed_at)
    cluster.leaves, cluster.pods = found.leaves, found.pods
    # Inside the transaction, so that a backend that refuses (scontrol fails) leaves nothing in
    # our books; and undone if the transaction then rolls back, so that no reservation outlives
    # it (one left behind would hold the nodes and the name from every later placement).
    backend = backend_for(fleet.backend, fleet.settings)
    ref = backend.reserve(cluster.name, [n for n, _ in found.nodes])
    if ref is not None:
        on_rollback(s, lambda: backend.release(ref))
    cluster.backend_ref = ref
    # Jobs stopped by a preemption start again, in their own job dirs: they resume from checkpoints.
    waiting = s.scalars(sa.select(Job).where(Job.cluster_name == cluster.name, Job.state == "pending",
                                             Job.backend_ref.is_(None)).order_by(Job.id)).all()
    for job in waiting:
        start_job(s, fleet, job, cluster)
        job.detail = f"restarted on {', '.join(cluster.node_names)} after {job.preemptions} preemption(s)"
    return True


def sync_nodes(s: Session, fleet: Fleet) -> None:
    """Copies the backend's live node states (Slurm's DOWN, DRAIN) into our books, where it has any."""
    live = backend_for(fleet.backend, fleet.settings).node_states()
    if live:
        for node in s.scalars(sa.select(Node).where(Node.name.in_(list(live)))):
            node.state, node.reason = live[node.name]


def place_queued(s: Session, fleet: Fleet) -> list[str]:
    """Places queued clusters, highest priority then oldest first, with bounded backfill and
    preemption of lower priorities; returns the names placed."""
    placed, waiting = [], []
    queued = sa.select(Cluster).where(Cluster.state == "queued").order_by(Cluster.priority.desc(), Cluster.id)
    for cluster in s.scalars(queued).all():
        if any(w.bypassed >= BACKFILL_LIMIT for w in waiting):
            break
        if _try_place(s, fleet, cluster):
            placed.append(cluster.name)
            for w in waiting:
                w.bypassed += 1
        else:
            waiting.append(cluster)
    return placed
