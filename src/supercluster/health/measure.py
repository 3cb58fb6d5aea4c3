"""Single-node measurements: accelerator inventory, GEMM, memory and copy bandwidth.

Each function returns a `Measurement` with its unit. On an accelerator node every device is
measured and the slowest one is the node's figure (one slow GPU slows every step of a job);
the per-device numbers go in `detail`. torch is imported inside the functions.

A CPU node's GEMM and memory bandwidth are per core: one thread's work per second of the CPU
time it got (`time.thread_time`). Wall-clock figures on a shared 2-core machine swung 3-10x
with other processes' load (a healthy node drained on noise), while these stayed within a few
percent with a busy loop on the other core; a slow, throttled or faulty core still reads low.
"""

from __future__ import annotations

import os
import time

from supercluster.hardware.local import measure_matmul_tflops
from supercluster.hardware.timing import best_rate
from supercluster.health.results import Measurement


def device_kind() -> tuple[str, int]:
    """(device type, device count) of this node: ("cuda", 8) on a GPU node, ("cpu", 0) otherwise."""
    from supercluster.hardware.device import local_devices

    devices = local_devices()
    return devices.type, devices.count


def is_nvidia() -> bool:
    """NVIDIA GPUs (ROCm also reports the "cuda" device type, but sets torch.version.hip)."""
    import torch

    return device_kind()[0] == "cuda" and torch.version.hip is None


def _devices() -> list[str]:
    kind, count = device_kind()
    return [f"{kind}:{i}" for i in range(count)] or ["cpu"]


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.accelerator.synchronize(torch.device(device))


def _best_rate(work, device: str, units: float, seconds: float) -> float:
    """units/s of the fastest of repeated `work()` calls on `device` over about `seconds`."""
    return best_rate(work, units, seconds, sync=lambda: _sync(device))


def accelerator_count() -> Measurement:
    """GPUs seen by torch on accelerator nodes; usable CPU cores on CPU nodes."""
    kind, count = device_kind()
    if kind == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return Measurement("accelerator_count", float(cores), "cores", {"device_type": "cpu"})
    from supercluster.hardware.device import device_name

    names = [device_name(f"{kind}:{i}") for i in range(count)]
    return Measurement("accelerator_count", float(count), "devices", {"device_type": kind, "names": names})


PER_CORE = "one thread, per second of its own CPU time"


def _per_core_rate(work, units: float, seconds: float) -> float:
    """units/s of CPU time of one thread doing `work` (torch's ops run in the calling thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best_rate(work, units, seconds, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)


def gemm(size: int, seconds: float) -> Measurement:
    """Dense square matmul TFLOP/s: bf16 on accelerators (per device), fp32 per core on CPUs."""
    import torch

    devices = _devices()
    if devices == ["cpu"]:
        a, b = torch.randn(size, size), torch.randn(size, size)
        value = _per_core_rate(lambda: a @ b, 2 * size**3, seconds) / 1e12
        return Measurement("gemm_tflops", value, "TFLOP/s per core", {"dtype": "fp32", "size": size, "method": PER_CORE})
    dtype = "bf16"
    per_device = {d: measure_matmul_tflops(dtype, size, seconds, d) for d in devices}
    return Measurement(
        "gemm_tflops", min(per_device.values()), "TFLOP/s",
        {"dtype": dtype, "size": size, "per_device": per_device},
    )


def memory_bandwidth(nbytes: int, seconds: float) -> Measurement:
    """Device memory bandwidth of a large copy, counting read + write bytes (STREAM "copy")."""
    import torch

    def rate(device: str) -> float:  # a function, so that each device's buffers are freed before the next
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # touch every page
        dst = torch.zeros_like(src)
        if device == "cpu":
            return _per_core_rate(lambda: dst.copy_(src), 2 * src.nbytes, seconds) / 1e9
        return _best_rate(lambda: dst.copy_(src), device, 2 * src.nbytes, seconds) / 1e9

    if _devices() == ["cpu"]:
        return Measurement("memory_bandwidth", rate("cpu"), "GB/s per core", {"bytes": nbytes, "method": PER_CORE})
    per_device = {device: rate(device) for device in _devices()}
    return Measurement(
        "memory_bandwidth", min(per_device.values()), "GB/s", {"bytes": nbytes, "per_device": per_device}
    )


def host_device_bandwidth(nbytes: int, seconds: float) -> Measurement:
    """Pinned host<->device copy GB/s, the slower direction of the slowest device."""
    import torch

    kind, count = device_kind()
    if count == 0:
        return Measurement.skipped(
            "host_device_bandwidth", "GB/s", "no accelerator: a CPU node has no host<->device link", applies=False
        )
    def rates(device: str) -> dict:
        host = torch.ones(nbytes // 4, dtype=torch.float32, pin_memory=True)
        dev = torch.empty_like(host, device=device)
        return {
            "host_to_device": _best_rate(lambda: dev.copy_(host, non_blocking=True), device, host.nbytes, seconds) / 1e9,
            "device_to_host": _best_rate(lambda: host.copy_(dev, non_blocking=True), device, host.nbytes, seconds) / 1e9,
        }

    per_device = {device: rates(device) for device in _devices()}
    value = min(min(v.values()) for v in per_device.values())
    return Measurement("host_device_bandwidth", value, "GB/s", {"bytes": nbytes, "per_device": per_device})


def device_to_device_bandwidth(nbytes: int, seconds: float) -> Measurement:
    """Peer copy GB/s from each device to the next one (NVLink/xGMI inside the node)."""
    import torch

    _, count = device_kind()
    if count < 2:
        return Measurement.skipped(
            "device_to_device_bandwidth", "GB/s", f"{count} accelerator(s): a peer copy needs 2", applies=False
        )
    devices = _devices()

    def rate(device: str, peer: str) -> float:
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src, device=peer)

        def copy():
            dst.copy_(src)
            _sync(device)

        return _best_rate(copy, peer, src.nbytes, seconds) / 1e9

    pairs = [(device, devices[(i + 1) % len(devices)]) for i, device in enumerate(devices)]
    per_pair = {f"{a}->{b}": rate(a, b) for a, b in pairs}
    return Measurement(
        "device_to_device_bandwidth", min(per_pair.values()), "GB/s", {"bytes": nbytes, "per_pair": per_pair}
    )
