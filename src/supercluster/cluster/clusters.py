"""Clusters: named gang allocations of GPUs, placed on the fleet and queued when they do not fit.

Every change runs in one locked transaction (`Database.transaction`), so two `cluster create`
commands racing for the same nodes are served in turn. The queue is FIFO with backfill: when
the oldest waiting request does not fit, later ones that fit start anyway, but each time that
happens the waiting request counts it, and after `BACKFILL_LIMIT` such bypasses nothing
behind it starts until it does (clusters have no end time to plan a reservation around, so
this bounds starvation instead).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from supercluster.cluster import placement
from supercluster.cluster.backends import backend_for, canonical_gpu_type
from supercluster.cluster.state import (
    DEFAULT_HEALTH_MAX_AGE_S,
    JOB_ACTIVE,
    Allocation,
    Cluster,
    Database,
    Fleet,
    Job,
    Node,
    now,
    on_rollback,
    open_db,
)
from supercluster.errors import UserError, closest

BACKFILL_LIMIT = 8
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def eligible(node, cluster: Cluster, at: float) -> bool:
    """The health gate: up, and either never checked (unless required) or passed recently."""
    if node.state != "up":
        return False
    if node.last_health_status is None:
        return not cluster.require_health
    return node.last_health_status == "passed" and at - (node.last_health_at or 0) <= cluster.health_max_age_s


def _capacity(s: Session, gpu_type: str) -> list[sa.Row]:
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


def _geometry(nodes: list[sa.Row]) -> tuple[int, int]:
    """GPUs per node and the largest number of nodes under one leaf switch, for a GPU type."""
    return max(n.gpus for n in nodes), max(Counter(n.leaf for n in nodes).values())


def _free(nodes: list[sa.Row], cluster: Cluster, at: float) -> list[placement.Free]:
    return [placement.Free(n.name, n.leaf, n.pod, n.gpus - n.used_gpus, n.gpus) for n in nodes if eligible(n, cluster, at)]


def _try_place(s: Session, fleet: Fleet, cluster: Cluster) -> bool:
    nodes = _capacity(s, cluster.gpu_type)
    node_gpus, _ = _geometry(nodes)
    found = placement.place(_free(nodes, cluster, now()), cluster.gpus, node_gpus, cluster.max_switches)
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


def schedule(s: Session, fleet: Fleet) -> list[str]:
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


def _validate_request(s: Session, name: str, gpus: int, gpu_type: str | None, max_switches: int | None) -> tuple[str, int, int]:
    if not NAME_RE.match(name):
        raise UserError(f"Cluster name {name!r} is not valid; use up to 63 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    if s.scalar(sa.select(Cluster.id).where(Cluster.name == name)) is not None:
        raise UserError(f"A cluster named {name!r} already exists; choose another name or delete it first.")
    if gpus <= 0:
        raise UserError(f"--gpus must be a positive number of GPUs, got {gpus}.")
    types = sorted(set(s.scalars(sa.select(Node.gpu_type))))
    if gpu_type is None:
        if len(types) > 1:
            raise UserError(f"The fleet has several GPU types; pass --gpu-type with one of {', '.join(types)}.")
        gpu_type = types[0]
    else:
        gpu_type = canonical_gpu_type(gpu_type)  # unknown to the catalog: raises with "did you mean"
        if gpu_type not in types:
            raise UserError(f"The fleet has no {gpu_type} nodes{closest(gpu_type, types)}; use --gpu-type {' or '.join(types)}.")
    nodes = _capacity(s, gpu_type)
    node_gpus, per_leaf = _geometry(nodes)
    total = sum(n.gpus for n in nodes)
    if gpus > total:
        raise UserError(f"{gpus} GPUs is more than the fleet's {total} {gpu_type} GPUs; ask for at most {total}.")
    if gpus > node_gpus and gpus % node_gpus:
        lower, upper = gpus // node_gpus * node_gpus, math.ceil(gpus / node_gpus) * node_gpus
        raise UserError(
            f"{gpus} GPUs is not a multiple of {node_gpus} (GPUs per {gpu_type} node); ask for {lower} or {upper} to get whole nodes."
        )
    bound = placement.lower_bound(gpus, node_gpus, per_leaf)
    if max_switches is not None and max_switches < bound:
        raise UserError(f"{gpus} GPUs need at least {bound} leaf switches; pass --max-switches {bound} or more.")
    return gpu_type, node_gpus, bound


def create_cluster(
    db: Database | str | None,
    name: str,
    gpus: int,
    *,
    gpu_type: str | None = None,
    wait: bool = True,
    max_switches: int | None = None,
    require_health: bool = False,
    health_max_age_s: float = DEFAULT_HEALTH_MAX_AGE_S,
) -> dict:
    """Places a cluster now, or queues it (wait=True); with wait=False one that does not fit is an error."""
    db = open_db(db)
    with db.transaction() as s:
        fleet = db.fleet(s)
        sync_nodes(s, fleet)  # never place on a node Slurm already knows is down
        gpu_type, node_gpus, bound = _validate_request(s, name, gpus, gpu_type, max_switches)
        cluster = Cluster(
            name=name, gpus=gpus, gpu_type=gpu_type, state="queued", max_switches=max_switches,
            require_health=require_health, health_max_age_s=health_max_age_s, bypassed=0, lower_bound=bound,
            created_at=now(),
        )
        s.add(cluster)
        s.flush()
        schedule(s, fleet)
        if cluster.state != "ready" and not wait:
            free = sum(f.free for f in _free(_capacity(s, gpu_type), cluster, now())
                       if gpus < node_gpus or f.free == f.total)
            raise UserError(
                f"{gpus} {gpu_type} GPUs do not fit now ({free} usable GPUs free"
                f"{f' within {max_switches} leaf switches' if max_switches else ''}); drop --no-wait to queue the request."
            )
    return show_cluster(db, name)


def get_cluster(s: Session, name: str) -> Cluster:
    cluster = s.scalar(sa.select(Cluster).where(Cluster.name == name))
    if cluster is None:
        names = s.scalars(sa.select(Cluster.name)).all()
        raise UserError(f"No cluster named {name!r}{closest(name, names)}; see `supercluster cluster list`.")
    return cluster


def cluster_dict(s: Session, c: Cluster) -> dict:
    by_name = {n.name: n for n in s.scalars(sa.select(Node).where(Node.name.in_(c.node_names)))}
    nodes = [by_name[a.node_name] for a in c.allocations]
    position = None
    if c.state == "queued":
        position = s.scalar(sa.select(sa.func.count()).where(Cluster.state == "queued", Cluster.id <= c.id))
    return {
        "name": c.name, "state": c.state, "gpus": c.gpus, "gpu_type": c.gpu_type,
        "nodes": [{"name": n.name, "gpus": a.gpus, "leaf": n.leaf, "pod": n.pod, "address": n.address, "status": n.status}
                  for a, n in zip(c.allocations, nodes)],
        "switches": sorted({n.leaf for n in nodes}), "leaves": c.leaves, "pods": c.pods, "lower_bound": c.lower_bound,
        "max_switches": c.max_switches, "queue_position": position, "reservation": c.backend_ref,
        "created_at": c.created_at, "placed_at": c.placed_at,
        "jobs": [j.id for j in s.scalars(sa.select(Job).where(Job.cluster_name == c.name).order_by(Job.id))],
    }


def show_cluster(db: Database | str | None, name: str) -> dict:
    db = open_db(db)
    with db.transaction(lock=False) as s:
        return cluster_dict(s, get_cluster(s, name))


def list_clusters(db: Database | str | None = None) -> list[dict]:
    db = open_db(db)
    with db.transaction(lock=False) as s:
        query = sa.select(Cluster).options(selectinload(Cluster.allocations)).order_by(Cluster.id)
        return [cluster_dict(s, c) for c in s.scalars(query)]


def delete_cluster(db: Database | str | None, name: str, *, force: bool = False) -> list[str]:
    """Releases a cluster's nodes; refuses while it runs jobs unless force (which cancels them).

    Returns the queued clusters that started on the freed nodes.
    """
    from supercluster.cluster import jobs

    db = open_db(db)
    jobs.refresh(db)  # a job that ended since we last looked must not block the delete
    with db.transaction() as s:
        fleet = db.fleet(s)
        cluster = get_cluster(s, name)
        active = s.scalars(sa.select(Job).where(Job.cluster_name == name, Job.state.in_(JOB_ACTIVE))).all()
        if active and not force:
            ids = ", ".join(str(j.id) for j in active)
            raise UserError(f"Cluster {name!r} still runs job {ids}; cancel it first or pass --force.")
        for job in active:
            jobs.cancel_in_session(s, fleet, job)
        if cluster.backend_ref:
            # Released before commit: if the commit then fails, the books still name a reservation
            # that is gone, and the next delete finds nothing to release and goes on.
            backend_for(fleet.backend, fleet.settings).release(cluster.backend_ref)
        s.delete(cluster)
        s.flush()
        s.expire_all()
        return schedule(s, fleet)
