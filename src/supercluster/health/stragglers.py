"""Stragglers: ranks whose steps stay slower than the others' during training.

In a synchronous job every step waits for the slowest rank, so one slow node (throttled GPU,
bad cooling, a noisy neighbour) costs the whole job. The trainer gathers each rank's step time
(compute before the gradient sync, so that waiting for others does not even the figures out)
and hands them to a `StragglerMonitor` each step; a rank whose step time stays above the median
of all ranks by `margin` over a whole `window` of steps is reported with its host.

    monitor = StragglerMonitor(hosts={0: "node1", 1: "node2"}, margin=0.2, window=20)
    for step ...:
        for s in monitor.observe({rank: seconds, ...}):
            log(s); count_against_node(s)   # supercluster.health.gate.report_stragglers
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Straggler:
    rank: int
    host: str
    ratio: float  # the rank's step time / the median rank's, median over the window
    step_time_s: float  # the rank's median step time over the window
    median_step_time_s: float  # the median over ranks, median over the window
    steps: int  # window length the verdict rests on

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"rank {self.rank} on {self.host}: {self.step_time_s * 1e3:.1f} ms/step, "
                f"{self.ratio:.2f}x the median {self.median_step_time_s * 1e3:.1f} ms over {self.steps} steps")


def _host(hosts: Mapping[int, str] | Sequence[str], rank: int) -> str:
    try:
        return hosts[rank]
    except (KeyError, IndexError):
        return "unknown"


def find_stragglers(step_times_by_rank: Mapping[int, float | Sequence[float]],
                    hosts: Mapping[int, str] | Sequence[str], margin: float = 0.2) -> list[Straggler]:
    """Ranks slower than the median rank by more than `margin`, judged over a window of steps.

    `step_times_by_rank` maps rank -> seconds of one step, or -> the seconds of the same window
    of steps for every rank. Each step is compared with that step's median over ranks, and a
    rank is reported when the median of its ratios exceeds 1 + margin: one slow step (a
    checkpoint, a GC pause) does not make a straggler, staying slow does.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    windows = {r: [t] if isinstance(t, (int, float)) else list(t) for r, t in step_times_by_rank.items()}
    if len(windows) < 2:
        return []  # nobody to compare with
    steps = min(len(w) for w in windows.values())
    windows = {r: w[-steps:] for r, w in windows.items()}
    medians = [statistics.median(w[i] for w in windows.values()) for i in range(steps)]
    found = []
    for rank, times in sorted(windows.items()):
        ratio = statistics.median(t / m for t, m in zip(times, medians) if m > 0) if any(medians) else 1.0
        if ratio > 1 + margin:
            found.append(Straggler(rank, _host(hosts, rank), ratio, statistics.median(times),
                                   statistics.median(medians), steps))
    return found


class StragglerMonitor:
    """Keeps the last `window` step times per rank; `observe` reports ranks that stayed slow."""

    def __init__(self, hosts: Mapping[int, str] | Sequence[str], margin: float = 0.2, window: int = 20):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.hosts, self.margin, self.window = hosts, margin, window
        self._times: dict[int, deque] = {}

    def observe(self, step_times_by_rank: Mapping[int, float]) -> list[Straggler]:
        for rank, seconds in step_times_by_rank.items():
            self._times.setdefault(rank, deque(maxlen=self.window)).append(float(seconds))
        if min(len(t) for t in self._times.values()) < self.window:
            return []  # not enough evidence yet
        return find_stragglers(self._times, self.hosts, self.margin)
