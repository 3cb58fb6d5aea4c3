"""The best of repeated timed bursts: how every throughput probe here is measured.

A probe on a shared machine can only read low (another process took the cores, the caches, the
memory bus), never high, so the fastest burst is the figure closest to what the hardware does.
torch-free: the caller passes the work and, for a device that runs asynchronously, how to wait
for it.
"""

from __future__ import annotations

import time
from typing import Callable


def best_rate(work: Callable[[], object], units: float, seconds: float = 0.0, min_repeats: int = 1,
              sync: Callable[[], object] | None = None, clock: Callable[[], float] = time.perf_counter) -> float:
    """units/s of the fastest timed `work()` call, after one untimed warm-up call.

    Repeats for about `seconds` (of wall time) and at least `min_repeats` times; `sync` waits for
    queued device work (kernel launches return before the kernel ends), so it is part of every
    timed call. `clock` times each call: wall time by default; `time.thread_time` counts only the
    CPU time the calling thread got, which other processes on the machine do not change.
    """
    sync = sync or (lambda: None)
    work()  # warm up kernels, caches and page mappings
    sync()
    best, repeats, deadline = 0.0, 0, time.perf_counter() + seconds
    while repeats < min_repeats or time.perf_counter() < deadline:
        start = clock()
        work()
        sync()
        best = max(best, units / max(clock() - start, 1e-12))
        repeats += 1
    return best
