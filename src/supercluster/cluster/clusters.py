"""Clusters: named gang allocations of GPUs, placed on the fleet and queued when they do not fit.

Every change runs in one locked transaction (`Database.transaction`), so two `cluster create`
commands racing for the same nodes are served in turn. A request that does not fit waits in
the queue (`queue.place_queued`: FIFO with bounded backfill).
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster import jobs, placement, preempt
from supercluster.cluster.backends import canonical_gpu_type
from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.queue import free_capacity, place_queued, sync_nodes, topology, type_geometry, why_waiting
from supercluster.cluster.state import (
    DEFAULT_HEALTH_MAX_AGE_S,
    JOB_ACTIVE,
    Allocation,
    Cluster,
    Database,
    Fleet,
    Job,
    Node,
    get_cluster,
    node_status,
    now,
    open_db,
    plain,
)
from supercluster.cluster.usage import close_intervals
from supercluster.errors import UserError, closest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class NameTaken(UserError):
    """A cluster of that name exists: a caller with names of its own (the service) words it its own way."""

    def __init__(self, name: str):
        super().__init__(f"A cluster named {name!r} already exists; choose another name or delete it first.")
        self.name = name


_NAME_TAKEN = sa.select(Cluster.id).where(Cluster.name == sa.bindparam("name"))


def _validate_request(s: Session, fleet: Fleet, name: str, gpus: int, gpu_type: str | None, max_switches: int | None) -> tuple[str, int, int]:
    if not NAME_RE.match(name):
        raise UserError(f"Cluster name {name!r} is not valid; use up to 63 letters, digits, '.', '_' or '-', starting with a letter or digit.")
    if s.scalar(_NAME_TAKEN, {"name": name}) is not None:
        raise NameTaken(name)
    if gpus <= 0:
        raise UserError(f"--gpus must be a positive number of GPUs, got {gpus}.")
    types = sorted(topology(s, fleet).empty)
    if gpu_type is None:
        if len(types) > 1:
            raise UserError(f"The fleet has several GPU types; pass --gpu-type with one of {', '.join(types)}.")
        gpu_type = types[0]
    else:
        gpu_type = canonical_gpu_type(gpu_type)  # unknown to the catalog: raises with "did you mean"
        if gpu_type not in types:
            raise UserError(f"The fleet has no {gpu_type} nodes{closest(gpu_type, types)}; use --gpu-type {' or '.join(types)}.")
    node_gpus, per_leaf, total = type_geometry(s, fleet, gpu_type)
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
    owner: str | None = None,
    priority: int = 0,
    record: Callable[[Session], None] | None = None,
) -> dict:
    """Places a cluster now, or queues it (wait=True); with wait=False one that does not fit is an error.

    owner: an opaque tag (the service passes its project) that usage is grouped by.
    priority: a request that does not fit may preempt clusters of lower priority (see `preempt`).
    record: called with the session inside this transaction once the request is valid, before the
    cluster is added or anything placed, so that the caller's own books (the service's row for
    it) commit with the fleet's or neither does; it may refuse the request by raising (its quota).
    """
    db = open_db(db)
    with db.transaction() as s:
        fleet = db.fleet(s)
        sync_nodes(s, fleet)  # never place on a node Slurm already knows is down
        gpu_type, node_gpus, bound = _validate_request(s, fleet, name, gpus, gpu_type, max_switches)
        if record is not None:
            record(s)
        cluster = Cluster(
            name=name, gpus=gpus, gpu_type=gpu_type, state="queued", max_switches=max_switches,
            require_health=require_health, health_max_age_s=health_max_age_s, bypassed=0, lower_bound=bound,
            created_at=now(), owner=owner, priority=priority,
        )
        s.add(cluster)
        s.flush()
        place_queued(s, fleet)
        if cluster.state != "ready" and not wait:
            free = sum(f.free for f in free_capacity(s, cluster, node_gpus, now()))
            raise UserError(
                f"{gpus} {gpu_type} GPUs do not fit now ({free} usable GPUs free"
                f"{f' within {max_switches} leaf switches' if max_switches else ''}); drop --no-wait to queue the request."
            )
    # Described after the commit, from a snapshot: why a queued cluster waits is a search of
    # the fleet's free capacity, which need not hold every other writer back.
    with db.reading() as s:  # a plain row (read by attribute, as the object is): loading an object costs more
        row = s.execute(_ROW_BY_ID, {"id": cluster.id}).first()
        return cluster_dict(s, row or cluster)


@functools.lru_cache(maxsize=8)
def _described(among: sa.Select | None = None) -> tuple:
    """The statements `cluster_dicts` runs, built once per way of naming its clusters (building a
    statement costs more than running these): by a list of ids (`ids`, `names`), or by `among`,
    a SELECT of their ids with its own parameters (a list of hundreds of ids cost more to send
    than the rows it selected). The nodes of some clusters with their status, which needs every
    allocation on those nodes, not only the clusters' own; their jobs; the queued ones' places in
    the queue's order (`place_queued`: highest priority first, then oldest), numbered by the
    database, which returns only the places asked for."""
    ids = sa.bindparam("ids", expanding=True) if among is None else among
    names = sa.bindparam("names", expanding=True) if among is None else sa.select(Cluster.name).where(Cluster.id.in_(among))
    used_there = (sa.select(Allocation.node_name, sa.func.sum(Allocation.gpus).label("used"))
                  .where(Allocation.node_name.in_(sa.select(Allocation.node_name).where(Allocation.cluster_id.in_(ids))))
                  .group_by(Allocation.node_name).subquery())
    nodes_of = (
        sa.select(Allocation.cluster_id, Allocation.gpus, Node.name, Node.leaf, Node.pod, Node.address, Node.state, Node.gpus,
                  sa.func.coalesce(used_there.c.used, 0))
        .join(Node, Node.name == Allocation.node_name)
        .outerjoin(used_there, used_there.c.node_name == Node.name)
        .where(Allocation.cluster_id.in_(ids))
        .order_by(Allocation.cluster_id, Allocation.node_name)
    )
    jobs_of = sa.select(Job.cluster_name, Job.id).where(Job.cluster_name.in_(names)).order_by(Job.id)
    ranked = (sa.select(Cluster.id, sa.func.row_number().over(order_by=(Cluster.priority.desc(), Cluster.id)).label("position"))
              .where(Cluster.state == "queued").subquery())
    positions = sa.select(ranked.c.id, ranked.c.position).where(ranked.c.id.in_(ids))
    return nodes_of, jobs_of, positions


_ROW_BY_ID = sa.select(*Cluster.__table__.c).where(Cluster.id == sa.bindparam("id"))
_ROWS_NAMED = sa.select(*Cluster.__table__.c).where(Cluster.name.in_(sa.bindparam("names", expanding=True))).order_by(Cluster.id)
_ACTIVE_JOBS = sa.select(Job).where(Job.cluster_name == sa.bindparam("name"), Job.state.in_(JOB_ACTIVE))
_FREE_NODES = sa.delete(Allocation).where(Allocation.cluster_id == sa.bindparam("id"))
_FORGET = sa.delete(Cluster).where(Cluster.id == sa.bindparam("id"))


def cluster_dict(s: Session, c: Cluster) -> dict:
    return cluster_dicts(s, [c])[0]


def cluster_dicts(s: Session, cs: list, among: sa.Select | None = None, params: dict | None = None) -> list[dict]:
    """What `cluster show` prints, for many clusters (`Cluster`s or rows of its table) in a few queries.
    among, params: a SELECT of exactly these clusters' ids and its parameters, where the caller
    has one (a project's clusters): faster than naming hundreds of them."""
    s.flush()
    if not cs:
        return []
    cs = plain(cs)
    conn = s.connection()
    nodes_of, jobs_of, positions_of = _described(among)
    queued = [c.id for c in cs if c.state == "queued"]
    if among is None:
        by_id, by_name, queued_by_id = {"ids": [c.id for c in cs]}, {"names": [c.name for c in cs]}, {"ids": queued}
    else:
        by_id = by_name = queued_by_id = params
    nodes: dict[int, list[dict]] = defaultdict(list)
    for cluster_id, gpus, name, leaf, pod, address, state, total, in_use in conn.execute(nodes_of, by_id):
        nodes[cluster_id].append({"name": name, "gpus": gpus, "leaf": leaf, "pod": pod, "address": address,
                                  "status": node_status(state, total, in_use)})
    jobs: dict[str, list[int]] = defaultdict(list)
    for cluster_name, job_id in conn.execute(jobs_of, by_name):
        jobs[cluster_name].append(job_id)
    positions = dict(conn.execute(positions_of, queued_by_id).all()) if queued else {}
    reasons: dict[tuple, str] = {}  # one answer per kind of request: a long queue is mostly alike

    def why(c) -> str | None:
        if c.state != "queued" or c.detail:
            return c.detail
        alike = (c.gpu_type, c.gpus, c.max_switches, c.require_health, c.health_max_age_s)
        if alike not in reasons:
            reasons[alike] = why_waiting(s, c)
        return reasons[alike]

    return [{
        "name": c.name, "state": c.state, "gpus": c.gpus, "gpu_type": c.gpu_type,
        "nodes": nodes[c.id], "switches": sorted({n["leaf"] for n in nodes[c.id]}), "leaves": c.leaves, "pods": c.pods,
        "lower_bound": c.lower_bound, "max_switches": c.max_switches,
        "queue_position": positions.get(c.id) if c.state == "queued" else None, "reservation": c.backend_ref,
        "owner": c.owner, "priority": c.priority, "cause": c.cause,
        # a structured cause in words, else the words of one from before causes, else why it waits
        "detail": preempt.describe(c.cause) if c.cause else why(c),
        "created_at": c.created_at, "placed_at": c.placed_at, "jobs": jobs[c.name],
    } for c in cs]


def show_cluster(db: Database | str | None, name: str) -> dict:
    db = open_db(db)
    with db.reading() as s:
        return cluster_dict(s, get_cluster(s, name))


def show_clusters(db: Database | str | None, names: list[str]) -> dict[str, dict]:
    """`show_cluster` of each of `names` that exists, by name, read at one moment."""
    with open_db(db).reading() as s:
        return show_clusters_in(s, names)


def show_clusters_in(s: Session, names: list[str]) -> dict[str, dict]:
    """`show_clusters` in a session the caller holds (the service reads its own tables beside)."""
    if not names:
        return {}
    # Plain rows (read by attribute, as the ORM's objects are): a project may hold hundreds.
    return {d["name"]: d for d in cluster_dicts(s, s.execute(_ROWS_NAMED, {"names": list(names)}).all())}


def list_clusters(db: Database | str | None = None) -> list[dict]:
    db = open_db(db)
    with db.reading() as s:
        return cluster_dicts(s, s.scalars(sa.select(Cluster).order_by(Cluster.id)).all())


def delete_cluster(db: Database | str | None, name: str, *, force: bool = False,
                   record: Callable[[Session], None] | None = None) -> list[str]:
    """Releases a cluster's nodes; refuses while it runs jobs unless force (which cancels them).

    Returns the queued clusters that started on the freed nodes. record: as for `create_cluster`.
    """
    db = open_db(db)
    jobs.refresh(db)  # a job that ended since we last looked must not block the delete
    with db.transaction() as s:
        fleet = db.fleet(s)
        cluster = get_cluster(s, name)
        active = s.scalars(_ACTIVE_JOBS, {"name": name}).all()
        if active and not force:
            ids = ", ".join(str(j.id) for j in active)
            raise UserError(f"Cluster {name!r} still runs job {ids}; cancel it first or pass --force.")
        for job in active:
            jobs.cancel_in_session(s, fleet, job)
        if cluster.backend_ref:
            # Released before commit: if the commit then fails, the books still name a reservation
            # that is gone, and the next delete finds nothing to release and goes on.
            backend_for(fleet.backend, fleet.settings).release(cluster.backend_ref)
        # Core deletes: the ORM cascade would load and delete each allocation on its own.
        close_intervals(s, cluster.id, now(), "deleted")
        s.execute(_FREE_NODES, {"id": cluster.id})
        s.execute(_FORGET, {"id": cluster.id})
        s.expire_all()
        started = place_queued(s, fleet)
        if record is not None:
            record(s)
        return started


def hold_cluster(db: Database | str | None, name: str, reason: str) -> dict:
    """Takes a cluster off the fleet until `release_cluster`: its jobs stop as preempted ones do
    (back to pending, resumed from their checkpoints when it is placed again) and its nodes go to
    the queue. For an owner that must stop paying (a spent budget), not for the fleet's own use."""
    db = open_db(db)
    with db.transaction() as s:
        fleet = db.fleet(s)
        cluster = get_cluster(s, name)
        preempt.stop(s, fleet, cluster, {"code": "held", "note": reason}, state="held", end_reason="held")
        place_queued(s, fleet)
        return cluster_dict(s, cluster)


def release_cluster(db: Database | str | None, name: str, *, record: Callable[[Session], None] | None = None) -> dict:
    """Puts a held cluster back in the queue (at its old place) and places what fits.

    record: called in this transaction before a held cluster goes back (as for `create_cluster`).
    """
    db = open_db(db)
    with db.transaction() as s:
        fleet = db.fleet(s)
        cluster = get_cluster(s, name)
        if cluster.state == "held":
            if record is not None:
                record(s)
            cluster.state, cluster.cause, cluster.detail = "queued", None, None
            place_queued(s, fleet)
        return cluster_dict(s, cluster)
