"""Throughput, MFU and memory, measured honestly, and the metrics.jsonl writer.

MFU is model FLOPs (6N plus attention, no recomputation counted) per second over the
peak of the devices in use. The peak comes from the hardware catalog for a known
accelerator, and from a measured matmul probe otherwise (a CPU); `peak_source` says which.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Peak:
    tflops: float  # per device (per rank)
    source: str  # "catalog:h100" or "measured:cpu fp32 matmul, 1 thread"


def device_peak(device: torch.device, dtype: str) -> Peak:
    from supercluster.hardware import local
    from supercluster.hardware.catalog import match_device_name
    from supercluster.hardware.device import device_name

    if device.type != "cpu":
        name = device_name(device)
        acc = match_device_name(name)
        if acc is not None and acc.peak_tflops.get(dtype):
            return Peak(acc.peak(dtype), f"catalog:{acc.name}")
        return Peak(local.measure_matmul_tflops(dtype, size=8192, device=device.type),
                    f"measured:{name} {dtype} matmul")
    threads = torch.get_num_threads()
    return Peak(local.local_peak(dtype, refresh=True), f"measured:cpu {dtype} matmul, {threads} thread{'s' * (threads > 1)}")


def memory_gib(device: torch.device) -> float:
    """Peak device memory allocated on accelerators; peak resident host memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsLog:
    """Appends one JSON object per step to `run_dir/metrics.jsonl` (rank 0 only) and, with
    `tensorboard`, the same step's scalars to TensorBoard event files in `run_dir/tensorboard/`
    (where `tensorboard --logdir` and most training dashboards look)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None
        self.board = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(f"train/{key}", value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board is not None:
            self.board.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RankStats:
    """Every rank's step time and peak memory, gathered to all ranks each step, and the
    ranks that stay slower than the others (a straggler: named by rank and host).

    A rank's step time is its own wall time for the step. Synchronous collectives make the
    fast ranks wait for the slow one, so the difference shows where a rank computes alone
    (its forward and backward before the next collective it needs), and in a pipeline
    where each stage's time is its own.
    """

    def __init__(self, world: int, rank: int, device: torch.device, margin: float = 0.2, window: int = 10):
        import socket

        import torch.distributed as dist

        from supercluster.health.stragglers import StragglerMonitor

        self.world, self.rank, self.device = world, rank, device
        self.hosts = [socket.gethostname()] * world
        if world > 1:
            dist.all_gather_object(self.hosts, socket.gethostname())
        self.monitor = StragglerMonitor(dict(enumerate(self.hosts)), margin=margin, window=window)

    def gather(self, step_time_s: float, mem_gib: float) -> dict:
        """{"step_time_s_by_rank": [...], "mem_gib_by_rank": [...], "stragglers": [...]} for this step."""
        import torch.distributed as dist

        mine = torch.tensor([step_time_s, mem_gib], dtype=torch.float64)
        if self.world > 1:
            everyone = [torch.zeros_like(mine) for _ in range(self.world)]
            dist.all_gather(everyone, mine)
        else:
            everyone = [mine]
        times = [float(t[0]) for t in everyone]
        found = self.monitor.observe(dict(enumerate(times)))
        return {"step_time_s_by_rank": times, "mem_gib_by_rank": [float(t[1]) for t in everyone],
                "stragglers": [s.to_dict() for s in found]}


def _collective_kind(op_name: str) -> str | None:
    name = op_name.lower()
    for needle, kind in (("reduce_scatter", "reduce_scatter"), ("allgather", "all_gather"),
                         ("all_gather", "all_gather"), ("allreduce", "all_reduce"), ("all_reduce", "all_reduce"),
                         ("alltoall", "all_to_all"), ("all_to_all", "all_to_all"), ("broadcast", "broadcast"),
                         ("recv", "recv"), ("send", "send")):
        if needle in name:
            return kind
    return None


def _tensor_bytes(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [value.numel() * value.element_size()]
    if isinstance(value, (list, tuple)):
        return [b for v in value for b in _tensor_bytes(v)]
    return []


class CollectiveBytes(TorchDispatchMode):
    """Bytes handed to each kind of collective while active (a `with` block), on this rank.

    Counted where every collective passes, the dispatcher: c10d ops from FSDP2, pipelining's
    send/recv and plain torch.distributed; functional collectives from DTensor (tensor and
    sequence parallel) and context parallelism. Per call, the size of the whole tensor the
    collective works on (the gathered output of an all-gather, the full input of a
    reduce-scatter, an all-reduce's buffer, a send's tensor); a cost model turns that into
    wire bytes for its algorithm. Costs a little time per op, so it is used for one step.
    """

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)  # "c10d._allgather_base_.default", "_c10d_functional.all_reduce.default"
        if "c10d" in name and "wait" not in name:
            kind = _collective_kind(name.split(".")[1] if "." in name else name)
            if kind is not None:
                functional = "_c10d_functional" in name
                # c10d ops take (output, input, ...), functional ones (input, ...).
                which = 1 if kind == "reduce_scatter" and not functional else 0
                size = sum(_tensor_bytes(args[which])) if len(args) > which else 0
                if functional and kind == "all_gather":
                    size *= int(args[1])  # (input, group_size, group_name)
                self.bytes[kind] = self.bytes.get(kind, 0) + size
                self.calls[kind] = self.calls.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))
