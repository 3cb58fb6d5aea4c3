"""The accelerators this process can see, found one way for every caller (the trainer picks its
rank's device, health counts devices, the local cluster backend names its GPU type, metrics
look a device up in the catalog).

torch is imported inside the functions, so that `hardware` stays importable without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LocalDevices:
    type: str  # torch device type: "cuda" (NVIDIA and ROCm), "xpu", "mps"... or "cpu"
    count: int  # accelerators visible; 0 when there are none
    name: str  # the first accelerator's name ("NVIDIA H100 80GB HBM3"), or the type where torch has none


def local_devices() -> LocalDevices:
    import torch

    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        return LocalDevices(kind, torch.accelerator.device_count(), device_name(f"{kind}:0"))
    return LocalDevices("cpu", 0, "cpu")


def device_name(device) -> str:
    """The product name torch reports for a device ("NVIDIA H200"), else its type ("cpu")."""
    import torch

    device = torch.device(device)
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "get_device_name"):
        return backend.get_device_name(device.index or 0)
    return device.type


def select_device(local_rank: int | None = None):
    """This rank's device, made current: accelerator LOCAL_RANK (modulo the count), or the CPU."""
    import torch

    devices = local_devices()
    if devices.count == 0:
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    index = local_rank % devices.count
    torch.accelerator.set_device_index(index)
    return torch.device(devices.type, index)


def resolve_precision(device, requested: str) -> str:
    """bf16 where the device runs it faster than fp32, else fp32 (CPUs without AVX-512 BF16
    emulate bf16 matmuls at a small fraction of fp32 speed, so the CPU is measured)."""
    if requested != "auto":
        return requested
    if str(device).startswith("cpu"):
        from supercluster.hardware.local import bf16_speedup

        return "bf16" if bf16_speedup() > 1.2 else "fp32"
    return "bf16"
