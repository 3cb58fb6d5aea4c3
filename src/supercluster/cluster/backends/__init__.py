"""Backends: where nodes come from and how a job's processes are started.

`local` is this machine, `slurm` a real Slurm cluster driven through its commands, `sim` a
simulated fleet for placement (it runs no jobs). Each implements `Backend`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from supercluster.errors import UserError

BACKENDS = ("local", "slurm", "sim")


@dataclass(frozen=True)
class NodeSpec:
    """A node as a backend reports it."""

    name: str
    gpu_type: str
    gpus: int
    leaf: str
    pod: str
    address: str | None = None
    state: str = "up"  # up | drain | down
    reason: str | None = None


@dataclass(frozen=True)
class Launch:
    """Everything a backend needs to start one job on a cluster's nodes."""

    job_id: int
    job_dir: str
    config: str
    overrides: tuple[str, ...]
    nodes: tuple[str, ...]  # node names, the first hosts the rendezvous
    gpus_per_node: int  # processes per node (one per GPU)
    max_restarts: int
    reservation: str | None = None


@dataclass(frozen=True)
class JobStatus:
    state: str  # pending | running | completed | failed | cancelled
    exit_code: int | None = None
    restarts: int = 0
    detail: str | None = None
    nodes: tuple[str, ...] = field(default=())


def train_command(launch: Launch, nnodes: int, node_rank: str = "0", rdzv: str | None = None, torchrun_restarts: int = 0) -> list[str]:
    """The `supercluster train` invocation for one node of `launch` (argv)."""
    cmd = [sys.executable, "-m", "supercluster.cli.main", "train", launch.config, "--nproc", str(launch.gpus_per_node), "--no-sample"]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node-rank", node_rank, "--rdzv", rdzv, "--rdzv-id", f"supercluster-job-{launch.job_id}"]
    if torchrun_restarts:
        cmd += ["--max-restarts", str(torchrun_restarts)]
    for item in (f"run.dir={launch.job_dir}/run", *launch.overrides):
        cmd += ["--set", item]
    return cmd


class Backend:
    name = ""

    def __init__(self, settings: dict | None = None):
        self.settings = dict(settings or {})

    def discover(self) -> list[NodeSpec]:
        raise NotImplementedError

    # Clusters: a backend may hold the nodes (Slurm reservation); the default keeps only our books.
    def reserve(self, cluster: str, nodes: list[str]) -> str | None:
        return None

    def update_reservation(self, ref: str, nodes: list[str]) -> None:
        pass

    def release(self, ref: str) -> None:
        pass

    def drain(self, node: str, reason: str) -> None:
        pass

    def resume(self, node: str) -> None:
        pass

    def node_states(self) -> dict[str, tuple[str, str | None]] | None:
        """Live (state, reason) per node where the backend knows better than our books, else None."""
        return None

    # Jobs.
    def submit(self, launch: Launch) -> str:
        raise UserError(f"The {self.name} backend runs no jobs; create the fleet with --backend local or slurm.")

    def poll(self, ref: str, job_dir: str) -> JobStatus:
        raise NotImplementedError

    def cancel(self, ref: str, job_dir: str) -> None:
        raise NotImplementedError

    def release_requeued(self, ref: str) -> None:
        """Lets a job that went back to pending after a failure start as soon as it fits."""

    def log_path(self, ref: str | None, job_dir: str) -> str:
        return f"{job_dir}/job.log"


def backend_for(name: str, settings: dict | None = None) -> Backend:
    if name == "sim":
        from supercluster.cluster.backends.sim import SimBackend as cls
    elif name == "local":
        from supercluster.cluster.backends.local import LocalBackend as cls
    elif name == "slurm":
        from supercluster.cluster.backends.slurm import SlurmBackend as cls
    else:
        raise UserError(f"Unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return cls(settings)


def canonical_gpu_type(name: str) -> str:
    """The catalog's name for a GPU type ("H100-SXM" -> "h100"); "local" is this machine's CPU."""
    from supercluster.hardware import catalog

    key = catalog.ALIASES.get(name.lower(), name.lower())
    if key == "local":
        return key  # catalog.accelerator("local") would measure the machine: not needed here
    return catalog.accelerator(key).name
