"""Pass marks for every check, and the calibrated baselines behind them.

Where a pass mark is published for the node type (Azure's node-health marks in
`hardware.catalog`: in-node all-reduce, host<->device, device-to-device), that figure is the
threshold. Everything else is judged against a baseline that `supercluster health calibrate`
measured on a known-good machine of the same kind: a check passes when it reaches
baseline x (1 - tolerance). Device fault counters (ECC, XID, NVLink, throttling) pass at zero.

"The same kind" is the catalog node type when the node has one (every ND H100 v5 is judged
against one baseline), otherwise `hardware.local.machine_key()` (host, CPU model, threads).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from supercluster.files import write_atomic
from supercluster.hardware import catalog
from supercluster.paths import home
from supercluster.health.results import FAILED, PASSED, SKIPPED, CheckResult, Measurement

# Tolerances below a baseline, per check: the floor of the pass band (the stated margin).
# Measured noise sets the rest: a calibration widens its own tolerance to NOISE_MULTIPLE x the
# coefficient of variation it saw over its repeats (capped at MAX_TOLERANCE: beyond that a check
# tells nothing). Wall-clock CPU figures on the shared 2-core machine had CVs of 14-55 % under
# other engineers' load, which drained healthy nodes; CPU GEMM and memory figures are now per
# core per second of CPU time (`measure`), and every probe is the best of repeated bursts.
# A node that fails a throughput check is measured again before it is judged (`runner.confirmed`).
TOLERANCE = {
    "gemm_tflops": 0.25,
    "memory_bandwidth": 0.25,
    "host_device_bandwidth": 0.15,
    "device_to_device_bandwidth": 0.15,
    "allreduce_busbw": 0.35,
    "multinode_allreduce_busbw": 0.35,
}
NOISE_MULTIPLE = 3.0
MAX_TOLERANCE = 0.5

# A throughput figure taken while tasks waited for a CPU more than this share of the time (Linux
# PSI) measured the crowd, not the node: below its threshold it is not judged rather than failed.
CONTENDED = 0.2

# Checks that count faults: any nonzero count fails.
FAULT_COUNTERS = ("ecc_errors", "xid_errors", "nvlink_inactive", "clock_throttle")


@dataclass(frozen=True)
class Rule:
    threshold: float
    comparison: str  # ">=", "<=" or "=="
    source: str
    unit: str | None = None  # a calibrated baseline's unit: a measurement in another is not comparable

    def holds(self, value: float) -> bool:
        if self.comparison == ">=":
            return value >= self.threshold
        if self.comparison == "<=":
            return value <= self.threshold
        return value == self.threshold


def node_type_for(gpu_type: str | None) -> catalog.NodeType | None:
    """The catalog node type of a fleet node with accelerator `gpu_type`; None for CPU/local nodes."""
    if not gpu_type:
        return None
    key = catalog.ALIASES.get(gpu_type.lower(), gpu_type.lower())
    if key not in catalog.DEFAULT_NODE or key == "local":
        return None
    return catalog.default_node_type(key)


# ---- baselines ------------------------------------------------------------------------------


def baseline_file() -> Path:
    return home() / "health-baselines.json"


def _read_all() -> dict:
    try:
        return json.loads(baseline_file().read_text())
    except (OSError, ValueError):
        return {}


def load_baseline(kind: str) -> dict | None:
    """{check: {"median", "cv", "unit", "runs", "measured_at"}} for machines of `kind`, or None."""
    return _read_all().get(kind)


def save_baseline(kind: str, runs: list[list[Measurement]], merge: bool = False) -> dict:
    """Median and coefficient of variation of each measured check over repeated runs.

    `merge` keeps the kind's other checks (adding a cluster's multi-node figure to a node baseline).
    """
    values: dict[str, list[float]] = {}
    units: dict[str, str] = {}
    for run in runs:
        for m in run:
            if m.value is not None and m.check not in FAULT_COUNTERS:
                values.setdefault(m.check, []).append(m.value)
                units[m.check] = m.unit
    entry = {}
    for check, xs in values.items():
        median = statistics.median(xs)
        cv = statistics.stdev(xs) / statistics.mean(xs) if len(xs) > 1 and statistics.mean(xs) else 0.0
        entry[check] = {"median": median, "cv": cv, "unit": units[check], "runs": len(xs), "measured_at": time.time()}
    table = _read_all()
    table[kind] = {**table.get(kind, {}), **entry} if merge else entry
    write_atomic(baseline_file(), json.dumps(table, indent=1))  # a concurrent reader sees the old table or the new one
    return table[kind]


def tolerance(check: str, calibration_cv: float = 0.0) -> float:
    """Fraction below the baseline median that still passes (counts must match exactly)."""
    if check == "accelerator_count":
        return 0.0
    return min(MAX_TOLERANCE, max(TOLERANCE.get(check, 0.25), NOISE_MULTIPLE * calibration_cv))


# ---- rules ---------------------------------------------------------------------------------


def rules_for(node_type: catalog.NodeType | None, baseline: dict | None, kind: str) -> dict[str, Rule]:
    rules: dict[str, Rule] = {c: Rule(0, "<=", "any fault fails the node") for c in FAULT_COUNTERS}
    for check, entry in (baseline or {}).items():
        if check == "accelerator_count":
            rules[check] = Rule(entry["median"], "==", f"calibrated baseline for {kind}")
        else:
            tol = tolerance(check, entry["cv"])
            rules[check] = Rule(
                entry["median"] * (1 - tol), ">=",
                f"calibrated baseline {entry['median']:.4g} {entry['unit']} for {kind} - {tol:.0%} tolerance", entry["unit"],
            )
    if node_type is not None:  # published figures win over a local calibration
        rules["accelerator_count"] = Rule(node_type.gpus_per_node, "==", node_type.source)
        for check, mark in (
            ("allreduce_busbw", node_type.allreduce_busbw_gbps),
            ("host_device_bandwidth", node_type.h2d_gbps),
            ("device_to_device_bandwidth", node_type.d2d_gbps),
        ):
            if mark is not None:
                rules[check] = Rule(mark, ">=", f"{node_type.name} pass mark ({node_type.source})")
    return rules


def judge(measurement: Measurement, rules: dict[str, Rule]) -> CheckResult:
    m = measurement
    base = dict(check=m.check, value=m.value, unit=m.unit, applies=m.applies, detail=m.detail)
    if m.value is None:
        return CheckResult(status=SKIPPED, reason=m.skip_reason, **base)
    rule = rules.get(m.check)
    if rule is None:
        return CheckResult(
            status=SKIPPED, **base,
            reason="no pass mark and no baseline: run `supercluster health calibrate` on a known-good machine",
        )
    if rule.unit is not None and rule.unit != m.unit:  # e.g. a CPU baseline from before figures were per core
        return CheckResult(status=SKIPPED, **base, reason=f"the baseline is in {rule.unit}, this measurement in {m.unit}: "
                                                          f"run `supercluster health calibrate` again")
    ok = rule.holds(m.value)
    contention = (m.detail or {}).get("cpu_contention")
    if not ok and contention is not None and contention > CONTENDED:
        return CheckResult(status=SKIPPED, **base, reason=(
            f"{m.value:.4g} {m.unit} is below {rule.threshold:.4g}, but other work kept tasks waiting for a CPU "
            f"{contention:.0%} of the time: not judged (and not drained); check the node while it is idle"))
    return CheckResult(
        status=PASSED if ok else FAILED, threshold=rule.threshold, comparison=rule.comparison, source=rule.source,
        reason=None if ok else f"{m.value:.4g} {m.unit}, needs {rule.comparison} {rule.threshold:.4g}", **base,
    )
