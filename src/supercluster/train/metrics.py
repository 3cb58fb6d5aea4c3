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


@dataclass
class Peak:
    tflops: float  # per device (per rank)
    source: str  # "catalog:h100" or "measured:cpu fp32 matmul, 1 thread"


def device_peak(device: torch.device, dtype: str) -> Peak:
    from supercluster.hardware import local

    if device.type != "cpu":
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        try:
            from supercluster.hardware.catalog import match_device_name

            acc = match_device_name(name)
            if acc is not None:
                return Peak(acc.peak_tflops[dtype], f"catalog:{acc.name}")
        except (ImportError, KeyError, AttributeError):
            pass
        return Peak(local.measure_matmul_tflops(dtype, size=8192, device=device.type),
                    f"measured:{name} {dtype} matmul")
    threads = torch.get_num_threads()
    return Peak(local.local_peak(dtype), f"measured:cpu {dtype} matmul, {threads} thread{'s' * (threads > 1)}")


def memory_gib(device: torch.device) -> float:
    """Peak device memory allocated on accelerators; peak resident host memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsLog:
    """Appends one JSON object per step to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(path, "a") if enabled else None

    def write(self, record: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
