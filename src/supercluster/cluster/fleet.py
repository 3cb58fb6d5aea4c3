"""The fleet: which nodes exist, where they sit in the fabric, and whether they may be used.

`init_fleet` imports the nodes from a backend (`local`: this machine; `slurm`: `scontrol`;
`sim`: a fat tree built from a spec). The health hooks (`record_health`, `drain_node`,
`resume_node`, `health_history`) are how health checks reach the fleet.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa

from supercluster.cluster.backends import BACKENDS, Backend
from supercluster.cluster.backends.registry import backend_for
from supercluster.cluster.queue import place_queued
from supercluster.cluster.state import (
    HEALTH_STATUSES,
    Allocation,
    Cluster,
    Database,
    Fleet,
    HealthResult,
    Node,
    now,
    on_rollback,
    open_db,
)
from supercluster.errors import UserError, closest


def init_fleet(db: Database | str | None, backend: str, *, spec: Path | dict | None = None, force: bool = False, **options) -> dict:
    """Creates the fleet's node inventory from `backend`; replaces an empty one with --force.

    spec: the sim backend's fleet spec, as a TOML path or a dict (see `backends.sim`).
    """
    db = open_db(db)
    if backend not in BACKENDS:
        raise UserError(f"Unknown backend {backend!r}{closest(backend, BACKENDS)}; choose one of {', '.join(BACKENDS)}.")
    settings = dict(options)
    if spec is not None:
        settings["spec"] = spec if isinstance(spec, dict) else _read_spec(spec)
    impl = backend_for(backend, settings)
    specs = impl.discover()  # outside the transaction: may run scontrol
    if not specs:
        raise UserError(f"The {backend} backend reports no nodes; check its configuration.")
    with db.transaction() as s:
        if s.get(Fleet, 1) is not None:
            if not force:
                raise UserError("A fleet already exists; pass --force to replace it (only when it holds no clusters).")
            if s.scalar(sa.select(sa.func.count()).select_from(Cluster)):
                raise UserError("The fleet still holds clusters; delete them before replacing the fleet.")
            s.execute(sa.delete(Node))
            s.execute(sa.delete(Fleet))
        s.add(Fleet(id=1, backend=backend, settings=impl.settings, created_at=now()))
        for n in specs:
            s.add(Node(name=n.name, gpu_type=n.gpu_type, gpus=n.gpus, leaf=n.leaf, pod=n.pod, address=n.address,
                       state=n.state, reason=n.reason))
    return summary(db)


def fleet_exists(db: Database | str | None) -> bool:
    with open_db(db).reading() as s:
        return s.get(Fleet, 1) is not None


def _read_spec(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"Fleet spec {str(path)!r} does not exist; pass the path of a TOML file.") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"Fleet spec {str(path)!r} is not valid TOML ({err}); fix the file.") from None


def node_dict(n: Node) -> dict:
    return {
        "name": n.name, "gpu_type": n.gpu_type, "gpus": n.gpus, "used_gpus": n.used_gpus, "leaf": n.leaf,
        "pod": n.pod, "address": n.address, "state": n.state, "status": n.status, "reason": n.reason,
        "last_health_status": n.last_health_status, "last_health_at": n.last_health_at,
        "clusters": sorted(a.cluster.name for a in n.allocations),
    }


def summary(db: Database | str | None = None) -> dict:
    """Nodes grouped by pod and leaf switch, with GPU counts by state (`fleet show`)."""
    db = open_db(db)
    with db.reading() as s:
        fleet = db.fleet(s)
        nodes = s.scalars(sa.select(Node).options(sa.orm.selectinload(Node.allocations).selectinload(Allocation.cluster))).all()
        leaves: dict[tuple[str, str], dict] = {}
        for n in sorted(nodes, key=lambda n: (n.pod, n.leaf, n.name)):
            row = leaves.setdefault((n.pod, n.leaf), {"pod": n.pod, "leaf": n.leaf, "nodes": 0, "gpus": 0, "free_gpus": 0,
                                                       "states": defaultdict(int)})
            row["nodes"] += 1
            row["gpus"] += n.gpus
            row["free_gpus"] += n.gpus - n.used_gpus if n.state == "up" else 0
            row["states"][n.status] += 1
        for row in leaves.values():
            row["states"] = dict(sorted(row["states"].items()))
        return {
            "backend": fleet.backend,
            "nodes": len(nodes),
            "gpus": sum(n.gpus for n in nodes),
            "free_gpus": sum(r["free_gpus"] for r in leaves.values()),
            "gpu_types": sorted({n.gpu_type for n in nodes}),
            "pods": len({n.pod for n in nodes}),
            "leaves": list(leaves.values()),
            "node_list": [node_dict(n) for n in sorted(nodes, key=lambda n: n.name)],
        }


# ---- health hooks --------------------------------------------------------------------------


def _get_node(s, name: str) -> Node:
    node = s.get(Node, name)
    if node is None:
        names = s.scalars(sa.select(Node.name)).all()
        raise UserError(f"No node {name!r} in the fleet{closest(name, names)}; see `supercluster fleet show`.")
    return node


def has_node(db: Database | str | None, name: str) -> bool:
    with open_db(db).transaction(lock=False) as s:
        return s.get(Node, name) is not None


def open_backend(db: Database | str | None = None) -> Backend:
    """The fleet's backend, with its stored settings (e.g. the Slurm cluster's SLURM_CONF)."""
    db = open_db(db)
    with db.transaction(lock=False) as s:
        fleet = db.fleet(s)
        return backend_for(fleet.backend, fleet.settings)


def nodes(db: Database | str | None = None, cluster: str | None = None) -> list[dict]:
    """All nodes, or those of one cluster, as dicts (see `node_dict`)."""
    db = open_db(db)
    with db.reading() as s:
        query = sa.select(Node).order_by(Node.name)
        if cluster is not None:
            c = s.scalar(sa.select(Cluster).where(Cluster.name == cluster))
            if c is None:
                raise UserError(f"No cluster named {cluster!r}; see `supercluster cluster list`.")
            query = query.where(Node.name.in_(c.node_names))
        return [node_dict(n) for n in s.scalars(query)]


def record_health(db: Database | str | None, node: str, results: Iterable, passed: bool, measured_at: float | None = None) -> None:
    """Stores one health run of `node` (every check, for history) and its verdict."""
    db = open_db(db)
    when = measured_at if measured_at is not None else now()
    with db.transaction() as s:
        n = _get_node(s, node)
        for r in results:
            r = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
            status = r.get("status")
            if status not in HEALTH_STATUSES:
                raise ValueError(f"health status must be one of {HEALTH_STATUSES}, got {status!r}")
            s.add(HealthResult(
                node_name=node, check_name=r.get("check") or r.get("check_name") or r["name"],
                value=_float_or_none(r.get("value")), unit=r.get("unit"), threshold=_float_or_none(r.get("threshold")),
                status=status, detail=r.get("detail"), measured_at=r.get("measured_at") or when,
            ))
        n.last_health_status = "passed" if passed else "failed"
        n.last_health_at = when


def _float_or_none(value):
    return None if value is None else float(value)


def health_history(db: Database | str | None = None, node: str | None = None, limit: int = 100) -> list[dict]:
    with open_db(db).reading() as s:
        query = sa.select(HealthResult).order_by(HealthResult.measured_at.desc(), HealthResult.id.desc()).limit(limit)
        if node is not None:
            query = query.where(HealthResult.node_name == node)
        return [
            {"node": r.node_name, "check": r.check_name, "value": r.value, "unit": r.unit, "threshold": r.threshold,
             "status": r.status, "detail": r.detail, "measured_at": r.measured_at}
            for r in s.scalars(query)
        ]


def _restorer(backend: Backend, node: str, state: str, reason: str | None):
    """Puts `node` back in the backend as our books had it, for a transaction that rolls back."""
    def restore() -> None:
        if state == "drain":
            backend.drain(node, reason or "")
        elif state == "up":
            backend.resume(node)
        # down: the hardware said so, not us; nothing to put back
    return restore


def drain_node(node: str, reason: str, *, db: Database | str | None = None) -> None:
    """Takes `node` out of placement; clusters already on it keep it until they are deleted."""
    db = open_db(db)
    with db.transaction() as s:
        n = _get_node(s, node)
        backend = backend_for(db.fleet(s).backend, db.fleet(s).settings)
        backend.drain(node, reason)
        on_rollback(s, _restorer(backend, node, n.state, n.reason))
        n.state, n.reason = "drain", reason


def resume_node(node: str, *, db: Database | str | None = None, only_if_out: bool = False) -> list[str]:
    """Returns a drained or down node to service and starts queued clusters that now fit (their names).

    only_if_out: refuse a node already up (the operator's `node undrain`, where that is a typo's sign).
    """
    db = open_db(db)
    with db.transaction() as s:
        n = _get_node(s, node)
        if only_if_out and n.state == "up":
            raise UserError(f"Node {node!r} is already up; `supercluster fleet show --nodes` lists the drained ones.")
        fleet = db.fleet(s)
        backend = backend_for(fleet.backend, fleet.settings)
        backend.resume(node)
        on_rollback(s, _restorer(backend, node, n.state, n.reason))
        n.state, n.reason = "up", None
        return place_queued(s, fleet)
