"""CPU kernels PyTorch does not ship, compiled at first use for the CPU at hand.

`blocks_linear.cpp` multiplies activations, quantized on the fly to int8 blocks of 32, by weights
in 4- or 8-bit blocks of 32: the integer arithmetic llama.cpp runs on CPUs. PyTorch's CPU ops
lack it: its int4 kernel takes bf16 activations, and its int8-activation kernels scale a whole
tensor at once, which SmolLM2's outlier features do not survive. It is built with the machine's
C++ compiler through `torch.utils.cpp_extension` (`-march=native`: AVX-512 VNNI, AVX2 or plain
C++, whichever this CPU runs), once per source and instruction set, into PyTorch's extension
cache ($TORCH_EXTENSIONS_DIR; about 20 s on 2 cores).
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path

import torch

from supercluster.errors import UserError

SOURCE = Path(__file__).with_name("blocks_linear.cpp")


# The instruction sets a build may target: the CPU's own, and (for tests of the other code paths)
# AVX2 without AVX-512, and plain x86-64, whose kernel is portable C++.
ARCHITECTURES = {"native": "-march=native", "avx2": "-march=haswell", "portable": "-march=x86-64"}


@functools.cache
def blocks_linear(arch: str = "native"):
    """torch.ops.<namespace>.linear(x, qweight, d, m, bits, out_features), built on first call."""
    from torch.utils import cpp_extension

    # A build targets one CPU, so its cache entry is named after the instruction set as well as the source.
    flags = _cpu_flags() if arch == "native" else ARCHITECTURES[arch]
    name = f"supercluster_blocks_{arch}_{hashlib.sha256(SOURCE.read_bytes() + flags.encode()).hexdigest()[:12]}"
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], is_python_module=False,
                           extra_cflags=["-O3", ARCHITECTURES[arch], f"-DBLOCKS_LIBRARY={name}"])
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        first = next(iter(str(error).strip().splitlines()), type(error).__name__)
        raise UserError(f"--quantize int4 needs its C++ kernel, which did not build here ({first}); "
                        "install g++ or serve with --quantize none.") from None
    return getattr(torch.ops, name).linear


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
