"""What every backend is: the node and job records it trades in, and the `Backend` interface.

Health checks, cluster placement and jobs reach nodes only through this interface (as
SkyPilot keeps every engine behind one Backend): `run_on` runs a command on one node,
`launch_on` one multi-node step, `submit` a training job.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

from supercluster.errors import UserError
from supercluster.hardware import catalog

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
class JobSpec:
    """Everything a backend needs to start one job on a cluster's nodes."""

    job_id: int
    job_dir: str
    config: str
    overrides: tuple[str, ...]
    nodes: tuple[str, ...]  # node names, the first hosts the rendezvous
    gpus_per_node: int  # processes per node (one per GPU)
    max_restarts: int
    reservation: str | None = None
    command: tuple[str, ...] = ()  # an argv to run on the first node instead of training (a serving job)


@dataclass(frozen=True)
class JobStatus:
    state: str  # pending | running | completed | failed | cancelled
    exit_code: int | None = None
    restarts: int = 0
    detail: str | None = None
    nodes: tuple[str, ...] = field(default=())


def node_command(spec: JobSpec, nnodes: int, **train_args) -> list[str]:
    """What one node of `spec` runs: its own command, or its share of the training run."""
    return list(spec.command) if spec.command else train_command(spec, nnodes, **train_args)


def train_command(spec: JobSpec, nnodes: int, node_rank: str = "0", rdzv: str | None = None, torchrun_restarts: int = 0) -> list[str]:
    """The `supercluster train` invocation for one node of `spec` (argv)."""
    cmd = [sys.executable, "-m", "supercluster.cli.main", "train", spec.config, "--nproc", str(spec.gpus_per_node), "--no-sample"]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node-rank", node_rank, "--rdzv", rdzv, "--rdzv-id", f"supercluster-job-{spec.job_id}"]
    if torchrun_restarts:
        cmd += ["--max-restarts", str(torchrun_restarts)]
    # The job's own run directory comes last, after every override: the one key a job cannot set.
    for item in (*spec.overrides, f"run.dir={spec.job_dir}/run"):
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

    # Commands on nodes (health checks).
    def run_on(self, node: str, argv: list[str], *, timeout: float, reservation: str | None = None,
               drained_reason: str | None = None) -> subprocess.CompletedProcess:
        """Runs `argv` on `node` and waits for it, capturing stdout and stderr as text.

        reservation: the cluster reservation the node is held in (the command must run inside
        it); drained_reason: the node is drained with this reason, and must be checked anyway.
        Raises subprocess.TimeoutExpired after `timeout` seconds.
        """
        raise UserError(f"The {self.name} backend cannot run commands on node {node!r}; run the command on that node itself.")

    def launch_on(self, nodes: list[str], argv: list[str], *, tasks_per_node: int = 1, timeout: float,
                  reservation: str | None = None) -> subprocess.CompletedProcess | None:
        """Runs `argv` as one step across `nodes`, `tasks_per_node` tasks on each, and waits for it.

        Each task finds its rank, the task count and its device index on the node in
        SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID (RANK, WORLD_SIZE, LOCAL_RANK elsewhere).
        None where the backend launches no multi-node step.
        """
        return None

    # Jobs.
    runs_jobs = False  # one that does says so, and implements the methods below

    def check_runs_jobs(self) -> None:
        """Raises, before a job is written down, where this backend could never start it."""
        if not self.runs_jobs:
            raise UserError(f"The {self.name} backend runs no jobs; create the fleet with --backend local or slurm.")

    def submit(self, spec: JobSpec) -> str:
        self.check_runs_jobs()
        raise NotImplementedError

    def poll(self, ref: str, job_dir: str) -> JobStatus:
        raise NotImplementedError

    def cancel(self, ref: str, job_dir: str) -> None:
        raise NotImplementedError

    def preempt(self, ref: str, job_dir: str) -> None:
        """Stops a job whose nodes go to a higher priority; it is submitted again later, in the same
        job dir, and resumes from its latest checkpoint. The default is `cancel` (on Slurm, scancel
        sends SIGTERM, then SIGKILL after KillWait: time for the trainer's final checkpoint)."""
        self.cancel(ref, job_dir)

    def release_requeued(self, ref: str) -> None:
        """Lets a job that went back to pending after a failure start as soon as it fits."""

    def log_path(self, ref: str | None, job_dir: str) -> str:
        return f"{job_dir}/job.log"


def canonical_gpu_type(name: str) -> str:
    """The catalog's name for a GPU type ("H100-SXM" -> "h100"); "local" is this machine's CPU."""
    key = catalog.ALIASES.get(name.lower(), name.lower())
    if key == "local":
        return key  # catalog.accelerator("local") would measure the machine: not needed here
    return catalog.accelerator(key).name
