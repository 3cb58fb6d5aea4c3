"""The queue of clusters waiting for nodes, and the placing of them (the health gate included).

FIFO with backfill: when the oldest waiting request does not fit, later ones that fit start
anyway, but each time that happens the waiting request counts it, and after `BACKFILL_LIMIT`
such bypasses nothing behind it starts until it does (clusters have no end time to plan a
reservation around, so this bounds starvation instead). Called inside the caller's fleet
transaction whenever nodes may have been freed or added.
"""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster import placement
from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.state import Allocation, Cluster, Fleet, Node, now, on_rollback

BACKFILL_LIMIT = 8


def eligible(node, cluster: Cluster, at: float) -> bool:
    """The health gate: up, and either never checked (unless required) or passed recently."""
    if node.state != "up":
        return False
    if node.last_health_status is None:
        return not cluster.require_health
    return node.last_health_status == "passed" and at - (node.last_health_at or 0) <= cluster.health_max_age_s


def capacity(s: Session, gpu_type: str) -> list[sa.Row]:
    """Each node of a type with its used GPUs, as plain rows (one query: placement reads all nodes)."""
    used = sa.func.coalesce(sa.func.sum(Allocation.gpus), 0).label("used_gpus")
    query = (
        sa.select(Node.name, Node.leaf, Node.pod, Node.gpus, Node.state, Node.last_health_status, Node.last_health_at, used)
        .outerjoin(Allocation, Allocation.node_name == Node.name)
        .where(Node.gpu_type == gpu_type)
        .group_by(Node.name)
        .order_by(Node.name)
    )
    return list(s.execute(query))


def geometry(nodes: list[sa.Row]) -> tuple[int, int]:
    """GPUs per node and the largest number of nodes under one leaf switch, for a GPU type."""
    return max(n.gpus for n in nodes), max(Counter(n.leaf for n in nodes).values())


def free_nodes(nodes: list[sa.Row], cluster: Cluster, at: float) -> list[placement.Free]:
    return [placement.Free(n.name, n.leaf, n.pod, n.gpus - n.used_gpus, n.gpus) for n in nodes if eligible(n, cluster, at)]


def _try_place(s: Session, fleet: Fleet, cluster: Cluster) -> bool:
    nodes = capacity(s, cluster.gpu_type)
    node_gpus, _ = geometry(nodes)
    found = placement.place(free_nodes(nodes, cluster, now()), cluster.gpus, node_gpus, cluster.max_switches)
    if found is None:
        return False
    for name, gpus in found.nodes:
        s.add(Allocation(cluster_id=cluster.id, node_name=name, gpus=gpus))
    cluster.state, cluster.placed_at = "ready", now()
    cluster.leaves, cluster.pods = found.leaves, found.pods
    s.flush()
    # Inside the transaction, so that a backend that refuses (scontrol fails) leaves nothing in
    # our books; and undone if the transaction then rolls back, so that no reservation outlives
    # it (one left behind would hold the nodes and the name from every later placement).
    backend = backend_for(fleet.backend, fleet.settings)
    ref = backend.reserve(cluster.name, [n for n, _ in found.nodes])
    if ref is not None:
        on_rollback(s, lambda: backend.release(ref))
    cluster.backend_ref = ref
    s.flush()
    return True


def sync_nodes(s: Session, fleet: Fleet) -> None:
    """Copies the backend's live node states (Slurm's DOWN, DRAIN) into our books, where it has any."""
    live = backend_for(fleet.backend, fleet.settings).node_states()
    if live:
        for node in s.scalars(sa.select(Node).where(Node.name.in_(list(live)))):
            node.state, node.reason = live[node.name]


def place_queued(s: Session, fleet: Fleet) -> list[str]:
    """Places queued clusters, oldest first, with bounded backfill; returns the names placed."""
    placed, waiting = [], []
    for cluster in s.scalars(sa.select(Cluster).where(Cluster.state == "queued").order_by(Cluster.id)).all():
        if any(w.bypassed >= BACKFILL_LIMIT for w in waiting):
            break
        if _try_place(s, fleet, cluster):
            placed.append(cluster.name)
            for w in waiting:
                w.bypassed += 1
        else:
            waiting.append(cluster)
    return placed
