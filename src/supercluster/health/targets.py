"""Which nodes a health run covers, and where their checks run.

`local` is this machine (recorded in the fleet when the fleet knows it). `--node NAME` and
`--cluster NAME` look nodes up in the fleet; a node that is this machine is measured in this
process, any other through the fleet's backend (`Backend.run_on` starts `python -m
supercluster.health.runner` there; `Backend.launch_on` the multi-node all-reduce).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict

from supercluster.cluster import fleet
from supercluster.cluster.clusters import show_cluster
from supercluster.cluster.state import open_db
from supercluster.errors import UserError, closest
from supercluster.hardware.local import machine_key
from supercluster.health import allreduce, gate, runner, thresholds
from supercluster.health.results import Measurement, NodeReport


def this_host() -> str:
    return socket.gethostname()  # what the local backend names this machine's node


def _reservation(cluster: str | None, db) -> str | None:
    """The backend's hold on a cluster's nodes (a Slurm reservation): a reserved node runs nothing else."""
    return show_cluster(db, cluster)["reservation"] if cluster else None


def _run_on(node: dict, argv: list[str], timeout: float, db=None):
    """Run `argv` on a fleet node through the fleet's backend.

    A node that health drained is still re-checked (that is how it returns to service): the
    backend is told its drain reason so that it can let the check through and keep the drain.
    """
    drained_by_health = node["state"] == "drain" and (node["reason"] or "").startswith(gate.DRAIN_PREFIX)
    return fleet.open_backend(db).run_on(
        node["name"], argv, timeout=timeout, reservation=_reservation(node["clusters"][0] if node["clusters"] else None, db),
        drained_reason=node["reason"] if drained_by_health else None,
    )


def _measure_remote(node: dict, level: str, params: runner.Params | None, db) -> tuple[str, float, list[Measurement]]:
    argv = [sys.executable, "-m", "supercluster.health.runner", "--level", level]
    if params is not None:
        argv += ["--params", json.dumps(asdict(params))]
    try:
        proc = _run_on(node, argv, timeout=900, db=db)
    except subprocess.TimeoutExpired:
        raise UserError(f"The checks on node {node['name']!r} did not finish in 15 minutes; "
                        f"check that the node responds and try again.") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = ((proc.stderr or proc.stdout).strip() or "no output").splitlines()[-1]
        raise UserError(f"The checks could not start on node {node['name']!r} ({tail}); "
                        f"check that the node responds (`supercluster fleet show`) and try again.")
    data = json.loads(lines[-1])
    return data["machine_key"], data["started_at"], [Measurement.from_dict(m) for m in data["measurements"]]


def check_fleet_node(node: dict, level: str, params: runner.Params | None = None, db=None) -> NodeReport:
    """Measure one fleet node (here or through its backend) and judge it."""
    started, key = time.time(), machine_key()

    def measure() -> list[Measurement]:
        nonlocal key
        if node["name"] == this_host():
            return runner.measure_here(level, params)
        key, _, measurements = _measure_remote(node, level, params, db)
        return measurements

    return runner.confirmed(measure, lambda ms: runner.judge_node(node["name"], key, level, ms, started, node["gpu_type"]))


def fleet_nodes(node: str | None = None, cluster: str | None = None, db=None) -> list[dict]:
    """One fleet node by name, or every node of a cluster (all nodes when neither is given)."""
    if node is not None:
        every = fleet.nodes(db)
        match = [n for n in every if n["name"] == node]
        if not match:
            names = [n["name"] for n in every]
            raise UserError(f"No node {node!r} in the fleet{closest(node, names)}; see `supercluster fleet show`.")
        return match
    return fleet.nodes(db, cluster=cluster)


def local_node(db=None) -> dict | None:
    """This machine's fleet record, or None when there is no fleet or it does not list this host."""
    try:
        if fleet.has_node(open_db(db), this_host()):
            return fleet_nodes(node=this_host(), db=db)[0]
    except UserError:
        pass
    return None


def measure_cluster_fabric(cluster: str, level: str, params: runner.Params | None = None,
                           db=None) -> tuple[str, Measurement]:
    """A multi-node all-reduce over every node of `cluster`, launched by the fleet's backend.

    Returns the baseline kind of the cluster's nodes and the measurement (skipped where the
    fleet's backend launches no multi-node jobs).
    """
    nodes = fleet_nodes(cluster=cluster, db=db)  # raises the "no such cluster" error first
    kind = runner.baseline_kind(nodes[0]["gpu_type"], machine_key())
    # GPU nodes: one rank per GPU, as training runs; CPU nodes: one rank per node probes the link
    accelerators = thresholds.node_type_for(nodes[0]["gpu_type"]) is not None
    p = params or runner.level_params(level, "accelerator" if accelerators else "cpu")
    return kind, allreduce.multi_node(
        fleet.open_backend(db), [n["name"] for n in nodes], p.allreduce_bytes, p.allreduce_iters,
        tasks_per_node=nodes[0]["gpus"] if accelerators else 1, reservation=_reservation(cluster, db),
    )


def calibrate_fabric(cluster: str, level: str = "full", repeats: int = 3, db=None) -> tuple[str, dict]:
    """Add a known-good cluster's multi-node all-reduce busbw to its nodes' baseline."""
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, not {repeats}.")
    runs = []
    for _ in range(repeats):
        kind, measurement = measure_cluster_fabric(cluster, level, db=db)
        if measurement.value is None:
            raise UserError(f"Cannot calibrate cluster {cluster!r}: {measurement.skip_reason}.")
        runs.append([measurement])
    return kind, thresholds.save_baseline(kind, runs, merge=True)


def calibrate(level: str = "full", repeats: int = 3, cluster: str | None = None, db=None) -> tuple[str, dict]:
    """What `supercluster health calibrate` does: this machine's baseline, or with `cluster` its
    multi-node all-reduce added to its nodes' baseline. Returns the kind and, per check, the
    stored entry with the tolerance it will be judged with."""
    if cluster:
        kind, entry = calibrate_fabric(cluster, level, repeats, db=db)
    else:
        mine = local_node(db)
        kind, entry = runner.calibrate_here(level, repeats, gpu_type=mine["gpu_type"] if mine else None)
    return kind, {check: {**e, "tolerance": thresholds.tolerance(check, e["cv"])} for check, e in entry.items()}


def check_cluster_fabric(cluster: str, level: str, params: runner.Params | None = None, db=None):
    """The multi-node all-reduce judged against the calibrated baseline of the nodes' kind.

    A failure here cannot be pinned on one node, so it is reported, not stored against nodes,
    and drains nothing; the per-node checks find the culprit.
    """
    kind, measurement = measure_cluster_fabric(cluster, level, params, db)
    return thresholds.judge(measurement, thresholds.rules_for(None, thresholds.load_baseline(kind), kind))


def run_checks(node: str | None = None, cluster: str | None = None, level: str = "quick", record: bool = True,
               db=None) -> tuple[list[dict], dict | None]:
    """What `supercluster health` does: check this machine, a node or a cluster, and gate.

    Returns the node reports (dicts with the gate's `action`) and, for a cluster, the judged
    multi-node all-reduce (None otherwise).
    """
    if node and cluster:
        raise UserError("Pass either --node or --cluster, not both.")
    runner.level_params(level, "cpu")  # validates the level before minutes of work
    reports = []
    if node or cluster:
        for n in fleet_nodes(node, cluster, db):
            report = check_fleet_node(n, level, db=db)
            reports.append({**report.to_dict(), "action": gate.record(report, db) if record else "not recorded"})
    elif (mine := local_node(db)) is not None:
        report = check_fleet_node(mine, level, db=db)
        reports.append({**report.to_dict(), "action": gate.record(report, db) if record else "not recorded"})
    else:
        report = runner.check_here(this_host(), level)
        reports.append({**report.to_dict(), "action": "not recorded (this machine is not in the fleet)"})
    fabric = check_cluster_fabric(cluster, level, db=db).to_dict() if cluster else None
    return reports, fabric
