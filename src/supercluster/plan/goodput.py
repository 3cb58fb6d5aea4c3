"""Failures and goodput: how often to checkpoint, and how long training really takes.

A job on N GPUs fails as often as its GPUs together do (independent, exponential failures):
its mean time between failures is M = 1 / (N * rate per GPU-hour). Every failure loses the
work since the last checkpoint plus a restart; every checkpoint costs its write time delta.

- Young 1974: the interval that minimises the waste to first order is sqrt(2 * delta * M).
- Daly 2006 ("A higher order estimate of the optimum checkpoint interval for restart
  dumps", FGCS 22): tau = sqrt(2 delta M) * (1 + sqrt(delta/(2M))/3 + delta/(18M)) - delta for
  delta < 2M, else M; and the expected wall time for T of solve time with restart time R,
  T_wall = M * exp(R/M) * (exp((tau + delta)/M) - 1) * T / tau.
The default failure rate is Meta's Llama 3 405B run (Dubey et al. 2024, sec. 3.3.4): 419
unexpected interruptions in 54 days on 16,384 H100s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from supercluster.errors import UserError

LLAMA3_FAILURES_PER_GPU_HOUR = 419 / (54 * 24 * 16384)
# Meta's checkpoint storage (Tectonic, Llama 3 paper sec. 3.1): 2 TB/s sustained.
DEFAULT_WRITE_GBPS = 2000.0
DEFAULT_RESTART_S = 600.0  # reschedule, reload the checkpoint, warm up (minutes in practice)
# A checkpoint holds fp32 weights and Adam's two fp32 moments: 12 bytes per parameter.
CHECKPOINT_BYTES_PER_PARAM = 12


@dataclass(frozen=True)
class Goodput:
    mtbf_hours: float  # of the whole job
    checkpoint_write_s: float
    checkpoint_interval_s: float
    effective_fraction: float  # useful training time / wall time
    failures_expected: float
    ideal_days: float  # without failures or checkpoints
    days: float  # with them
    cost: float | None  # at the given price per GPU-hour, failures included

    def as_dict(self) -> dict:
        return asdict(self)


def young_interval(write_s: float, mtbf_s: float) -> float:
    return math.sqrt(2 * write_s * mtbf_s)


def daly_interval(write_s: float, mtbf_s: float) -> float:
    """Daly's optimum compute time between checkpoints."""
    if write_s >= 2 * mtbf_s:
        return mtbf_s
    x = write_s / (2 * mtbf_s)
    return math.sqrt(2 * write_s * mtbf_s) * (1 + math.sqrt(x) / 3 + x / 9) - write_s


def wall_time(solve_s: float, interval_s: float, write_s: float, restart_s: float, mtbf_s: float) -> float:
    """Daly's expected wall time of `solve_s` of work checkpointed every `interval_s`."""
    return mtbf_s * math.exp(restart_s / mtbf_s) * math.expm1((interval_s + write_s) / mtbf_s) * solve_s / interval_s


def goodput(
    gpus: int,
    train_seconds: float,
    params: float,
    failures_per_gpu_hour: float = LLAMA3_FAILURES_PER_GPU_HOUR,
    write_gbps: float = DEFAULT_WRITE_GBPS,
    restart_s: float = DEFAULT_RESTART_S,
    price_per_gpu_hour: float | None = None,
) -> Goodput:
    """Checkpoint interval and effective time of `train_seconds` of failure-free training."""
    if failures_per_gpu_hour < 0 or write_gbps <= 0 or restart_s < 0:
        raise UserError("The failure rate and restart time must not be negative and the write bandwidth must be positive.")
    write_s = params * CHECKPOINT_BYTES_PER_PARAM / (write_gbps * 1e9)
    if failures_per_gpu_hour == 0:
        mtbf_s = math.inf
        interval, wall = train_seconds, train_seconds + write_s
    else:
        mtbf_s = 3600 / (gpus * failures_per_gpu_hour)
        interval = daly_interval(write_s, mtbf_s)
        wall = wall_time(train_seconds, interval, write_s, restart_s, mtbf_s)
    hours = wall / 3600
    return Goodput(
        mtbf_hours=mtbf_s / 3600,
        checkpoint_write_s=write_s,
        checkpoint_interval_s=interval,
        effective_fraction=train_seconds / wall if wall else 1.0,
        failures_expected=wall / mtbf_s,
        ideal_days=train_seconds / 86400,
        days=hours / 24,
        cost=None if price_per_gpu_hour is None else hours * gpus * price_per_gpu_hour,
    )


def checkpoint_every_steps(interval_s: float, step_time_s: float) -> int:
    """The checkpoint interval in optimizer steps (at least one), for train.checkpoint_every."""
    return max(1, round(interval_s / step_time_s))


def training_time(
    step_time_s: float, step_tokens: int, tokens: float, gpus: int, params: float, price_per_gpu_hour: float | None = None,
    failures_per_gpu_hour: float = LLAMA3_FAILURES_PER_GPU_HOUR, write_gbps: float = DEFAULT_WRITE_GBPS,
    restart_s: float = DEFAULT_RESTART_S,
) -> dict:
    """A plan's days and cost to train `tokens`, failures and checkpoints included, and the
    checkpoint interval in steps: the keys `plan` prints and writes to JSON."""
    seconds = tokens / step_tokens * step_time_s
    g = goodput(gpus, seconds, params, failures_per_gpu_hour, write_gbps, restart_s, price_per_gpu_hour)
    out = {
        "train_days": g.days,
        "train_days_without_failures": g.ideal_days,
        "effective_training_fraction": g.effective_fraction,
        "failures_expected": g.failures_expected,
        "mtbf_hours": g.mtbf_hours,
        "checkpoint_write_s": g.checkpoint_write_s,
        "checkpoint_interval_s": g.checkpoint_interval_s,
        "checkpoint_every_steps": checkpoint_every_steps(g.checkpoint_interval_s, step_time_s),
    }
    if g.cost is not None:
        out["train_cost"] = g.cost
    return out
