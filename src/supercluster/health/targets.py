"""Which nodes a health run covers, and where their checks run.

`local` is this machine (recorded in the fleet when the fleet knows it). `--node NAME` and
`--cluster NAME` look nodes up in the fleet; a node that is this machine is measured in this
process, any other through the backend (`python -m supercluster.health.runner` on the node).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import sqlalchemy as sa

from supercluster.errors import UserError
from supercluster.health import runner
from supercluster.health.results import Measurement, NodeReport


def this_host() -> str:
    return socket.gethostname()  # what the local backend names this machine's node


def _backend(db):
    from supercluster.cluster.backends import backend_for
    from supercluster.cluster.state import open_db

    database = open_db(db)
    with database.transaction(lock=False) as s:
        f = database.fleet(s)
        return backend_for(f.backend, f.settings)


def _srun_env(backend) -> dict:
    """srun's environment for the fleet's Slurm (its SLURM_CONF), until the backend offers one."""
    if hasattr(backend, "srun_env"):
        return backend.srun_env()
    conf = backend.settings.get("slurm_conf")
    return {**os.environ, **({"SLURM_CONF": conf} if conf else {})}


def _reservation_args(cluster: str | None, db) -> list[str]:
    """srun's `--reservation` for a cluster's Slurm reservation (a reserved node runs nothing else)."""
    from supercluster.cluster.state import Cluster, open_db

    if cluster is None:
        return []
    database = open_db(db)
    with database.transaction(lock=False) as s:
        ref = s.scalar(sa.select(Cluster.backend_ref).where(Cluster.name == cluster))
    return [f"--reservation={ref}"] if ref else []


def _run_on(backend, node: dict, argv: list[str], timeout: float, db=None) -> subprocess.CompletedProcess:
    """Run `argv` on a fleet node through its backend.

    Slurm starts nothing on a DRAINED node, yet that is exactly the node health re-checks; so
    a node that health drained is resumed in Slurm alone for the check and drained again right
    after it. Our books keep it drained throughout, so placement never picks it; `gate.record`
    then resumes it in both if it passed. `--immediate` fails fast instead of queueing.
    """
    if hasattr(backend, "run_on"):
        return backend.run_on(node["name"], argv, timeout)
    if backend.name != "slurm":
        raise UserError(f"The {backend.name} backend cannot run commands on node {node['name']!r}; "
                        f"run `supercluster health local` on that node instead.")
    from supercluster.health.gate import DRAIN_PREFIX

    reopen = node["state"] == "drain" and (node["reason"] or "").startswith(DRAIN_PREFIX)
    reservation = _reservation_args(node["clusters"][0] if node["clusters"] else None, db)
    command = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node['name']}", "--immediate=60", *reservation, *argv]
    if reopen:
        backend.resume(node["name"])
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_srun_env(backend))
    finally:
        if reopen:
            backend.drain(node["name"], node["reason"])


def _measure_remote(node: dict, level: str, params: runner.Params | None, db) -> tuple[str, float, list[Measurement]]:
    argv = [sys.executable, "-m", "supercluster.health.runner", "--level", level]
    if params is not None:
        argv += ["--params", json.dumps(asdict(params))]
    try:
        proc = _run_on(_backend(db), node, argv, timeout=900, db=db)
    except subprocess.TimeoutExpired:
        raise UserError(f"The checks on node {node['name']!r} did not finish in 15 minutes; "
                        f"see `scontrol show node {node['name']}` and its slurmd log.") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = ((proc.stderr or proc.stdout).strip() or "no output").splitlines()[-1]
        raise UserError(f"The checks could not start on node {node['name']!r} ({tail}); "
                        f"check the node with `scontrol show node {node['name']}` and try again.")
    data = json.loads(lines[-1])
    return data["machine_key"], data["started_at"], [Measurement.from_dict(m) for m in data["measurements"]]


def check_fleet_node(node: dict, level: str, params: runner.Params | None = None, db=None) -> NodeReport:
    """Measure one fleet node (here or through its backend) and judge it."""
    from supercluster.hardware.local import machine_key

    if node["name"] == this_host():
        started = time.time()
        key, measurements = machine_key(), runner.measure_here(level, params)
    else:
        key, started, measurements = _measure_remote(node, level, params, db)
    return runner.judge_node(node["name"], key, level, measurements, started, node["gpu_type"])


def fleet_nodes(node: str | None = None, cluster: str | None = None, db=None) -> list[dict]:
    from supercluster.cluster import fleet
    from supercluster.errors import closest

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
    from supercluster.cluster import fleet
    from supercluster.cluster.state import open_db

    try:
        if fleet.has_node(open_db(db), this_host()):
            return fleet_nodes(node=this_host(), db=db)[0]
    except UserError:
        pass
    return None


def measure_cluster_fabric(cluster: str, level: str, params: runner.Params | None = None,
                           db=None) -> tuple[str, Measurement]:
    """A multi-node all-reduce over every node of `cluster`, launched through Slurm's srun.

    Returns the baseline kind of the cluster's nodes and the measurement (skipped where the
    fleet's backend launches no multi-node jobs).
    """
    from supercluster.hardware.local import machine_key
    from supercluster.health import allreduce, thresholds

    nodes = fleet_nodes(cluster=cluster, db=db)  # raises the "no such cluster" error first
    backend = _backend(db)
    kind = runner.baseline_kind(nodes[0]["gpu_type"], machine_key())
    if backend.name != "slurm":
        return kind, Measurement.skipped("multinode_allreduce_busbw", "GB/s",
                                         f"the {backend.name} backend launches no multi-node job", applies=False)
    # GPU nodes: one rank per GPU, as training runs; CPU nodes: one rank per node probes the link
    accelerators = thresholds.node_type_for(nodes[0]["gpu_type"]) is not None
    p = params or runner.level_params(level, "accelerator" if accelerators else "cpu")
    return kind, allreduce.multi_node(
        [n["name"] for n in nodes], p.allreduce_bytes, p.allreduce_iters,
        tasks_per_node=nodes[0]["gpus"] if accelerators else 1,
        srun_args=_reservation_args(cluster, db), env=_srun_env(backend),
    )


def check_cluster_fabric(cluster: str, level: str, params: runner.Params | None = None, db=None):
    """The multi-node all-reduce judged against the calibrated baseline of the nodes' kind.

    A failure here cannot be pinned on one node, so it is reported, not stored against nodes,
    and drains nothing; the per-node checks find the culprit.
    """
    from supercluster.health import thresholds

    kind, measurement = measure_cluster_fabric(cluster, level, params, db)
    return thresholds.judge(measurement, thresholds.rules_for(None, thresholds.load_baseline(kind), kind))


def run_checks(node: str | None = None, cluster: str | None = None, level: str = "quick", record: bool = True,
               db=None) -> tuple[list[dict], dict | None]:
    """What `supercluster health` does: check this machine, a node or a cluster, and gate.

    Returns the node reports (dicts with the gate's `action`) and, for a cluster, the judged
    multi-node all-reduce (None otherwise).
    """
    from supercluster.health import gate

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
