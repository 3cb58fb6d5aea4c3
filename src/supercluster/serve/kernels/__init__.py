"""CPU kernels PyTorch does not ship, compiled at first use for the CPU at hand.

- `blocks_linear.cpp`: activations, quantized on the fly to int8 blocks of 32, times weights in
  4- or 8-bit blocks of 32 (`serve --quantize int4`): the integer arithmetic llama.cpp runs on
  CPUs. PyTorch's CPU ops lack it: its int4 kernel takes bf16 activations, and its int8-activation
  kernels scale a whole tensor at once, which SmolLM2's outlier features do not survive.
- `paged_attention.cpp`: a step's attention (RoPE, storing keys and values, every query against
  its own sequence) straight on the paged KV cache's blocks.
- `decoder.cpp`: every layer of a Llama-style int4 model in one call, composed of the two above,
  Mixture-of-Experts layers included (fp32 router, tokens grouped by expert, each chosen expert's
  blocks on its own rows).
- `vector_math.h`: an exponential that vectorizes and a dot product, for both; `parallel.h`: work
  shared over PyTorch's threads as each is free.

They are built together with the machine's C++ compiler through `torch.utils.cpp_extension`
(`-march=native`: AVX-512 VNNI, AVX2 or plain C++, whichever this CPU runs), once per source and
instruction set, into PyTorch's extension cache ($TORCH_EXTENSIONS_DIR; about 30 s on 2 cores), with
one line on stderr while a fresh build runs.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
from pathlib import Path

import torch

from supercluster.errors import UserError

SOURCES = [Path(__file__).with_name(name) for name in ("blocks_linear.cpp", "paged_attention.cpp", "decoder.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("kernels.h", "parallel.h", "vector_math.h")]
# The instruction sets a build may target: the CPU's own and, for tests of the other code paths,
# AVX2 without AVX-512 and plain x86-64 (portable C++).
BUILD_S = 60  # what a fresh build took on 2 busy cores (an idle pair: about 30)
ARCHITECTURES = {"native": "-march=native", "avx2": "-march=haswell", "portable": "-march=x86-64"}


@functools.cache
def library(arch: str = "native"):
    """The kernels' op namespace (`.linear`, `.paged_attention`, `.decoder_layers`), built on first call."""
    from torch.utils import cpp_extension

    # A build targets one CPU, so its cache entry is named after the instruction set as well as the sources.
    flags = _cpu_flags() if arch == "native" else ARCHITECTURES[arch]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + flags.encode()).hexdigest()[:12]
    name = f"supercluster_kernels_{arch}_{digest}"
    build = Path(cpp_extension._get_build_directory(name, verbose=False))
    _clear_stale_lock(build / "lock")
    if not (build / f"{name}.so").is_file():  # a cached build loads in a moment; a fresh one is worth a word
        print(f"building CPU kernels (first use, ~{BUILD_S} s)...", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], is_python_module=False,
                           extra_cflags=["-O3", "-fopenmp", ARCHITECTURES[arch], f"-DKERNELS_LIBRARY={name}"])
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        # the compiler's first error line says why; the rest of the message is the command line
        lines = str(error).splitlines()
        why = next((line.strip() for line in lines if "error:" in line), lines[0] if lines else type(error).__name__)
        raise UserError(f"supercluster's C++ kernels did not build here ({why[:300]}); install g++, "
                        "or serve with --quantize none or int8.") from None
    return getattr(torch.ops, name)


@functools.cache
def paged_attention():
    """The paged attention op, or None where the kernels do not build (attention then gathers
    the blocks and calls PyTorch's SDPA)."""
    try:
        return library().paged_attention
    except UserError:
        return None


STALE_LOCK_S = 600  # a build takes about 30 s here; a lock this old was left by a build that was killed


def _clear_stale_lock(lock: Path) -> None:
    """PyTorch's build lock names no owner, so a build killed mid-way (a timeout, ^C) leaves it
    behind and every later first use waits on it forever, printing nothing; an old one goes."""
    import time

    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
