"""The queue of clusters waiting for nodes, and the placing of them (the health gate included).

Highest priority first, then FIFO, with backfill; a request that does not fit may preempt
clusters of lower priority (`preempt`). Backfill: when the oldest waiting request does not
fit, later ones that fit start anyway, but each time that happens the waiting request counts it, and after `BACKFILL_LIMIT`
such bypasses nothing behind it starts until it does (clusters have no end time to plan a
reservation around, so this bounds starvation instead). Called inside the caller's fleet
transaction whenever nodes may have been freed or added.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import NamedTuple

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


@dataclass(frozen=True)
class Topology:
    """The fleet's nodes and where they sit, per GPU type: fixed from `fleet init` to the next one."""

    empty: dict[str, tuple[placement.Free, ...]]  # every node of a type as if nothing ran on it, by name
    node_gpus: dict[str, int]  # GPUs per node (the most, for a mixed type)
    per_leaf: dict[str, int]  # the most nodes of the type under one leaf switch
    total: dict[str, int]  # all GPUs of the type


# Placement runs on every create over the whole fleet. Where nodes sit changes only by `fleet init`,
# which writes a new fleet row, so one load per (database, fleet row) is kept.
_topologies: dict[tuple[str, float], Topology] = {}
_TOPOLOGIES_KEPT = 16  # databases one process may use at once (tests open many)


def topology(s: Session, fleet: Fleet) -> Topology:
    return _topology(s, fleet.created_at)


def _topology(s: Session, fleet_created_at: float) -> Topology:
    key = (s.get_bind().url.render_as_string(hide_password=False), fleet_created_at)
    found = _topologies.get(key)
    if found is None:
        rows = s.connection().execute(sa.select(Node.name, Node.gpu_type, Node.gpus, Node.leaf, Node.pod).order_by(Node.name)).all()
        empty: dict[str, list[placement.Free]] = defaultdict(list)
        leaves: dict[str, Counter] = defaultdict(Counter)
        for name, gpu_type, gpus, leaf, pod in rows:
            empty[gpu_type].append(placement.Free(name, leaf, pod, gpus, gpus))
            leaves[gpu_type][leaf] += 1
        found = Topology(
            empty={k: tuple(v) for k, v in empty.items()},
            node_gpus={k: max(f.total for f in v) for k, v in empty.items()},
            per_leaf={k: max(c.values()) for k, c in leaves.items()},
            total={k: sum(f.total for f in v) for k, v in empty.items()},
        )
        while len(_topologies) >= _TOPOLOGIES_KEPT:
            _topologies.pop(next(iter(_topologies)), None)  # another thread may have taken it
        _topologies[key] = found
    return found


def type_geometry(s: Session, fleet: Fleet, gpu_type: str) -> tuple[int, int, int]:
    """GPUs per node, the most nodes under one leaf switch, and all GPUs of a type."""
    topo = topology(s, fleet)
    return topo.node_gpus[gpu_type], topo.per_leaf[gpu_type], topo.total[gpu_type]


# Built once: building and caching a statement costs more than running these small ones.
_USED = sa.select(Allocation.node_name, sa.func.sum(Allocation.gpus)).group_by(Allocation.node_name)
_UNUSED = sa.select(Node.name).where(Node.gpu_type == sa.bindparam("gpu_type"), Node.name.not_in(sa.select(Allocation.node_name)))
_USED_IGNORING = _USED.where(Allocation.cluster_id.not_in(sa.bindparam("ignoring", expanding=True)))
# The nodes the health gate may turn away: all when health is required, else those that are not
# simply up and never checked (usually none).
_GATES = sa.select(Node.name, Node.state, Node.last_health_status, Node.last_health_at).where(Node.gpu_type == sa.bindparam("gpu_type"))
_GATED = _GATES.where(sa.not_(sa.and_(Node.state == "up", Node.last_health_status.is_(None))))


_ALLOCATE = sa.insert(Allocation)
_STOPPED_JOBS = (sa.select(Job).where(Job.cluster_name == sa.bindparam("name"), Job.state == "pending", Job.backend_ref.is_(None))
                 .order_by(Job.id))  # a preempted cluster's jobs, restarted when it is placed again


class _Gate(NamedTuple):
    """A node's columns that `eligible` reads, without loading the node."""

    state: str
    last_health_status: str | None
    last_health_at: float | None


def free_capacity(s: Session, cluster: Cluster, node_gpus: int, at: float, ignoring: set[int] = frozenset()) -> list[placement.Free]:
    """The eligible nodes that could hold part of `cluster`, as `placement.Free` tuples in name order.

    Placement runs on every create over the whole fleet, so only what changes is read: GPUs in
    use per node and the nodes the health gate may refuse; where nodes sit comes from `topology`.
    ignoring: clusters whose allocations count as free (to ask what preempting them would give).
    """
    return _capacity(s, topology(s, s.get(Fleet, 1)), cluster, node_gpus, at, ignoring)[0]


def _capacity(s: Session, topo: Topology, cluster, node_gpus: int, at: float,
              ignoring: set[int] = frozenset()) -> tuple[list[placement.Free], list[str]]:
    """`free_capacity`, and the names of the type's nodes out of service (drained or down), which
    the gate query reads anyway (it returns every node not simply up): `why_waiting` names them."""
    s.flush()  # the connection does not autoflush: pending node or allocation changes must count
    conn = s.connection()
    whole = cluster.gpus >= node_gpus
    if whole and not ignoring:
        # Whole nodes need only the names of the type's nodes nothing runs on, which the database
        # picks: on a full fleet none, where GPUs in use per node were a row for every node.
        used, unused = None, set(conn.execute(_UNUSED, {"gpu_type": cluster.gpu_type}).scalars())
    else:
        used = dict((conn.execute(_USED_IGNORING, {"ignoring": list(ignoring)}) if ignoring else conn.execute(_USED)).all())
    refused, out = set(), []
    for name, *gate in conn.execute(_GATES if cluster.require_health else _GATED, {"gpu_type": cluster.gpu_type}):
        gate = _Gate(*gate)
        if not eligible(gate, cluster, at):
            refused.add(name)
        if gate.state != "up":
            out.append(name)
    nodes = topo.empty.get(cluster.gpu_type, ())
    if whole:  # whole nodes: only those nothing runs on
        if used is None:
            return [n for n in nodes if n.name in unused and n.name not in refused], sorted(out)
        return [n for n in nodes if n.name not in used and n.name not in refused], sorted(out)
    free = (n._replace(free=n.total - used[n.name]) if n.name in used else n for n in nodes if n.name not in refused)
    return [n for n in free if n.free >= cluster.gpus], sorted(out)


def _try_place(s: Session, fleet: Fleet, queued) -> bool:
    """Places the queued cluster `queued` (a row of `_QUEUE`) if it fits, preempting for it if it may.
    Its ORM object is loaded only once it is placed: on a full fleet most tries find no room."""
    topo = topology(s, fleet)
    node_gpus = topo.node_gpus[queued.gpu_type]
    at = now()

    def find(ignoring: set[int] = frozenset()) -> placement.Placement | None:
        free = _capacity(s, topo, queued, node_gpus, at, ignoring)[0]
        return placement.place(free, queued.gpus, node_gpus, queued.max_switches)

    found = find()
    if found is None:
        pool = preempt.candidates(s, queued)
        victims = preempt.choose_victims(pool, lambda ids: find(ids) is not None) if pool else None
        if victims:
            preempt.preempt(s, fleet, victims, by=queued)
            found = find()
    if found is None:
        return False
    cluster = s.get(Cluster, queued.id)
    # One multi-row INSERT instead of an ORM object per node.
    s.connection().execute(_ALLOCATE, [{"cluster_id": cluster.id, "node_name": name, "gpus": gpus}
                                       for name, gpus in found.nodes])
    s.expire(cluster, ["allocations"])
    cluster.state, cluster.placed_at, cluster.cause, cluster.detail = "ready", now(), None, None
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
    waiting = s.scalars(_STOPPED_JOBS, {"name": cluster.name}).all()
    for job in waiting:
        start_job(s, fleet, job, cluster)
        job.cause, job.detail = None, f"restarted on {', '.join(cluster.node_names)} after {job.preemptions} preemption(s)"
    return True


def sync_nodes(s: Session, fleet: Fleet, live: dict[str, tuple] | None = None) -> None:
    """Copies the backend's live node states (Slurm's DOWN, DRAIN) into our books, where it has any
    (`live`: what the backend's `node_states` answered, when the caller asked it already)."""
    if live is None:
        live = backend_for(fleet.backend, fleet.settings).node_states()
    if live:
        for node in s.scalars(sa.select(Node).where(Node.name.in_(list(live)))):
            node.state, node.reason = live[node.name]


def place_queued(s: Session, fleet: Fleet) -> list[str]:
    """Places queued clusters, highest priority then oldest first, with bounded backfill and
    preemption of lower priorities; returns the names placed."""
    placed: list[str] = []
    waiting: list[int] = []  # ids of requests passed over in this pass, in queue order
    most_bypassed = -1  # the most bypasses of any of them (each placement adds one to all)
    # Requests alike in all that placement reads: once one does not fit, the next cannot either
    # until something is placed (a placement only takes nodes, but its preemptions may free more
    # than it takes). So a long queue of one size costs one search, not one per request. The
    # queue is read as plain rows and only a request tried becomes an object: on a full fleet,
    # every create and delete walks a queue of hundreds.
    refused: set[tuple] = set()
    s.flush()  # the connection does not autoflush: a change pending in the session must count
    conn = s.connection()
    # Once every kind of request in the queue has been refused since the last placement, no
    # request further on can be placed in this pass: the walk stops there. On a full fleet with
    # a queue of one kind that is at its first request, where reading and walking all of a queue
    # of hundreds was half of what a create or delete did under the write lock.
    kinds = {tuple(kind) for kind in conn.execute(_QUEUE_KINDS)}
    for row in _queue_rows(conn):
        if most_bypassed >= BACKFILL_LIMIT or kinds <= refused:
            break
        # (gpu_type, gpus, max_switches, require_health, health_max_age_s, priority), by position:
        # a row's attributes cost several times its items, over a queue of hundreds.
        alike = row[3:]
        if alike not in refused and _try_place(s, fleet, row):
            placed.append(row.name)
            refused.clear()
            if waiting:
                for i in range(0, len(waiting), 10_000):  # under SQLite's limit of bound parameters
                    s.execute(sa.update(Cluster).where(Cluster.id.in_(waiting[i:i + 10_000]))
                              .values(bypassed=Cluster.bypassed + 1))
                most_bypassed += 1
        else:
            waiting.append(row[0])  # id
            most_bypassed = max(most_bypassed, row[2])  # bypassed
            refused.add(alike)
    return placed


_ALIKE = (Cluster.gpu_type, Cluster.gpus, Cluster.max_switches, Cluster.require_health, Cluster.health_max_age_s, Cluster.priority)
_QUEUED = sa.select(Cluster.id, Cluster.name, Cluster.bypassed, *_ALIKE)  # then what placement reads (`place_queued` slices it)
_QUEUE_PAGE = 32
_QUEUE = _QUEUED.where(Cluster.state == "queued").order_by(Cluster.priority.desc(), Cluster.id).limit(_QUEUE_PAGE)
# The page after the request at (priority, id): placing requests takes them out of the queue, so
# an offset would skip some; the order's key does not change.
_QUEUE_AFTER = _QUEUE.where(sa.or_(Cluster.priority < sa.bindparam("priority"),
                                   (Cluster.priority == sa.bindparam("priority")) & (Cluster.id > sa.bindparam("id"))))
_QUEUE_KINDS = sa.select(*_ALIKE).where(Cluster.state == "queued").distinct()


def _queue_rows(conn):
    """The queue in its order (highest priority, then oldest), read a page at a time: a walk that
    stops early reads little, and each page is read whole before the walk changes any row."""
    page = conn.execute(_QUEUE).all()
    while page:
        yield from page
        if len(page) < _QUEUE_PAGE:
            return
        page = conn.execute(_QUEUE_AFTER, {"priority": page[-1].priority, "id": page[-1].id}).all()


_FLEET_CREATED = sa.select(Fleet.created_at).where(Fleet.id == 1)


def why_waiting(s: Session, cluster) -> str:
    """Why a queued cluster (a `Cluster` or a row of its table) is not placed: nodes taken out of
    service, too few free GPUs, or a place in the queue or a switch limit that the free ones miss."""
    # Asked by every read that shows a queued cluster, mostly in a reading session, where loading
    # the fleet row's object would be a query of its own: its creation time (which keys the
    # topology) is read as a plain value instead.
    topo = _topology(s, s.connection().execute(_FLEET_CREATED).scalar_one())
    node_gpus, total = topo.node_gpus[cluster.gpu_type], topo.total[cluster.gpu_type]
    capacity, out = _capacity(s, topo, cluster, node_gpus, now())
    free = sum(f.free for f in capacity)
    if free >= cluster.gpus:
        limit = f" within {cluster.max_switches} leaf switches" if cluster.max_switches else ""
        return f"waiting in the queue: {free} {cluster.gpu_type} GPUs are free, but not{limit} for it ahead of earlier requests"
    gpus_of = {n.name: n.total for n in topo.empty[cluster.gpu_type]}
    out_gpus = sum(gpus_of[n] for n in out)
    if out and free + out_gpus >= cluster.gpus:
        names = ", ".join(out[:4]) + (f" and {len(out) - 4} more" if len(out) > 4 else "")
        return (f"waiting for drained nodes: {out_gpus} of the fleet's {total} {cluster.gpu_type} GPUs are on "
                f"drained or down nodes ({names}); `supercluster node undrain NODE` returns one to service")
    return f"waiting for capacity: {free} of the fleet's {total} {cluster.gpu_type} GPUs are free for {cluster.gpus} asked"
