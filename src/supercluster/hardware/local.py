"""This machine as measured: a short matmul probe, cached per machine.

The probe needs torch, imported inside `measure_matmul_tflops` only, so that the planner can
read a cached figure (`cached_peak`) without paying torch's import time.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path

from supercluster.files import write_atomic
from supercluster.hardware.timing import best_rate
from supercluster.paths import home


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (figures are only comparable on the same one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int | None = None) -> str:
    """Identifies what the figure is valid for: host, CPU model and thread count."""
    threads = threads or os.cpu_count() or 1
    return f"{socket.gethostname()}|{cpu_model()}|{threads}"


def peak_file() -> Path:
    return home() / "local-peak.json"


def cached_peak(dtype: str, threads: int | None = None) -> float | None:
    """TFLOP/s measured earlier on this machine for `dtype`, or None."""
    try:
        table = json.loads(peak_file().read_text())
    except (OSError, ValueError):
        return None
    return table.get(machine_key(threads), {}).get(dtype)


def save_peak(dtype: str, tflops: float, threads: int | None = None) -> None:
    path = peak_file()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    table.setdefault(machine_key(threads), {})[dtype] = tflops
    write_atomic(path, json.dumps(table, indent=1))  # a reader never sees half a file


def measure_matmul_tflops(dtype: str = "fp32", size: int = 1024, seconds: float = 0.5, device: str = "cpu") -> float:
    """Dense square matmul throughput in TFLOP/s: the best of repeated timed bursts."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    # synchronize the device the operands live on (the current device may be another GPU)
    sync = (lambda: torch.accelerator.synchronize(a.device)) if device != "cpu" else None
    return best_rate(lambda: a @ b, 2 * size**3, seconds, sync=sync) / 1e12


def local_peak(dtype: str, threads: int | None = None, refresh: bool = False) -> float:
    """The CPU's matmul peak for `dtype` and a thread count, measured once and cached.

    `threads=None` means torch's current thread count. A cached figure is returned without
    importing torch, so the planner stays fast after the first measurement. With `refresh`
    the probe runs again and the cache keeps the best figure ever seen: other work on the
    machine can only make a probe read low, and a low peak would inflate every MFU after it.
    """
    if threads is not None and not refresh:
        value = cached_peak(dtype, threads)
        if value is not None:
            return value
    import torch

    previous = torch.get_num_threads()
    threads = threads or previous
    value = cached_peak(dtype, threads)
    if value is None or refresh:
        torch.set_num_threads(threads)
        try:
            measured = measure_matmul_tflops(dtype, seconds=0.3 if refresh else 0.5)
        finally:
            torch.set_num_threads(previous)
        value = max(measured, value or 0.0)
        save_peak(dtype, value, threads)
    return value


def memory_bandwidth_tbps(megabytes: int = 256, repeats: int = 5, refresh: bool = False) -> float:
    """Main-memory copy bandwidth in TB/s (bytes read + written), measured once with numpy.

    numpy rather than torch keeps the planner torch-free; cached next to the matmul peak
    (`refresh` measures again and replaces the cached figure).
    """
    value = None if refresh else cached_peak("mem_tbps")
    if value is None:
        import numpy as np

        src = np.ones(megabytes * 2**20 // 8)
        dst = np.empty_like(src)
        value = best_rate(lambda: np.copyto(dst, src), 2 * src.nbytes, min_repeats=repeats) / 1e12
        save_peak("mem_tbps", value)
    return value


def bf16_speedup() -> float:
    """How much faster bf16 matmuls run than fp32 on this CPU, measured once on small
    matrices (where bf16 is emulated it is ~100x slower, so the probe must stay small)."""
    import torch

    threads = torch.get_num_threads()
    value = cached_peak("bf16_speedup", threads)
    if value is None:
        value = measure_matmul_tflops("bf16", size=256, seconds=0.2) / measure_matmul_tflops("fp32", size=256, seconds=0.2)
        save_peak("bf16_speedup", value, threads)
    return value
