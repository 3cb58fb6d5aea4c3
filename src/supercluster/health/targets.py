"""Which nodes a health run covers, and where their checks run.

`local` is this machine (recorded in the fleet when the fleet knows it). `--node NAME` and
`--cluster NAME` look nodes up in the fleet; a node that is this machine is measured in this
process, any other through the backend (`python -m supercluster.health.runner` on the node).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import asdict

from supercluster.errors import UserError
from supercluster.health import runner
from supercluster.health.results import Measurement, NodeReport


def this_host() -> str:
    return socket.gethostname()  # what the local backend names this machine's node


def _emulated(db) -> bool:
    """Fleet settings say its GPUs are placeholders (emulated Slurm): judge nodes as CPU machines."""
    from supercluster.cluster.state import open_db

    database = open_db(db)
    with database.transaction(lock=False) as s:
        return bool(database.fleet(s).settings.get("emulated_gpus"))


def _judged_gpu_type(node: dict, measurements: list[Measurement], db) -> str | None:
    device_type = next((m.detail.get("device_type") for m in measurements if m.check == "accelerator_count"), None)
    if device_type == "cpu" and _emulated(db):
        return None
    return node["gpu_type"]


def _measure_remote(node: dict, level: str, params: runner.Params | None, db) -> tuple[str, float, list[Measurement]]:
    from supercluster.cluster import fleet
    from supercluster.cluster.backends import backend_for
    from supercluster.cluster.state import open_db

    database = open_db(db)
    with database.transaction(lock=False) as s:
        f = database.fleet(s)
        backend = backend_for(f.backend, f.settings)
    if not hasattr(backend, "run_on"):
        raise UserError(f"The {fleet.fleet_backend(db)} backend cannot run commands on node {node['name']!r} yet; "
                        f"run `supercluster health local` on that node instead.")
    argv = [sys.executable, "-m", "supercluster.health.runner", "--level", level]
    if params is not None:
        argv += ["--params", json.dumps(asdict(params))]
    proc = backend.run_on(node["name"], argv, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1]
        raise RuntimeError(f"health checks on {node['name']} exited {proc.returncode}: {tail}")
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
    gpu_type = _judged_gpu_type(node, measurements, db)
    return runner.judge_node(node["name"], key, level, measurements, started, gpu_type)


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
    from supercluster.cluster.backends import backend_for
    from supercluster.cluster.state import Cluster, open_db
    from supercluster.hardware.local import machine_key
    from supercluster.health import allreduce

    database = open_db(db)
    with database.transaction(lock=False) as s:
        f = database.fleet(s)
        backend, backend_name = backend_for(f.backend, f.settings), f.backend
        emulated = bool(f.settings.get("emulated_gpus"))
        reservation = s.query(Cluster.backend_ref).filter(Cluster.name == cluster).scalar()
    nodes = fleet_nodes(cluster=cluster, db=db)
    kind = runner.baseline_kind(None if emulated else nodes[0]["gpu_type"], machine_key())
    if backend_name != "slurm" or not hasattr(backend, "srun_env"):
        return kind, Measurement.skipped("multinode_allreduce_busbw", "GB/s",
                                         f"the {backend_name} backend launches no multi-node job", applies=False)
    p = params or runner.level_params(level, "cpu" if emulated else "accelerator")
    return kind, allreduce.multi_node(
        [n["name"] for n in nodes], p.allreduce_bytes, p.allreduce_iters,
        tasks_per_node=1 if emulated else max(1, nodes[0]["gpus"]),
        srun_args=[f"--reservation={reservation}"] if reservation else [], env=backend.srun_env(),
    )


def check_cluster_fabric(cluster: str, level: str, params: runner.Params | None = None, db=None):
    """The multi-node all-reduce judged against the calibrated baseline of the nodes' kind.

    A failure here cannot be pinned on one node, so it is reported, not stored against nodes,
    and drains nothing; the per-node checks find the culprit.
    """
    from supercluster.health import thresholds

    kind, measurement = measure_cluster_fabric(cluster, level, params, db)
    return thresholds.judge(measurement, thresholds.rules_for(None, thresholds.load_baseline(kind), kind))
