"""How long the health levels take here, and how noisy each check is.

    .venv/bin/python bench/health.py [--runs 5] [--levels quick,full] [--json]

For each level: wall time of one pass over every check (median over the runs), and per check
the median, the coefficient of variation (stdev / mean) over the runs, and the tolerance that
`health.thresholds` applies below a calibrated baseline: its default (`tol`) and the one a
calibration that saw this noise would use (`calib`: NOISE_MULTIPLE x CV, capped). The ratio
calib / CV says how far outside the run-to-run noise the pass mark sits (>= 3 means a healthy
node fails by noise alone in well under 1 % of runs, if the noise is roughly normal; below 3
only where the cap binds). Note: on a machine shared with other work the CV reflects that
work as much as the hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from supercluster.health import runner, thresholds


def bench(level: str, runs: int) -> dict:
    load_before = os.getloadavg()[0]  # other work on the machine shows up as noise: say how much there was
    durations, values, units = [], {}, {}
    for _ in range(runs):
        start = time.perf_counter()
        for m in runner.measure_here(level):
            if m.value is not None and m.check not in thresholds.FAULT_COUNTERS and m.check != "accelerator_count":
                values.setdefault(m.check, []).append(m.value)
                units[m.check] = m.unit
        durations.append(time.perf_counter() - start)
    checks = {}
    for check, xs in values.items():
        cv = statistics.stdev(xs) / statistics.mean(xs) if len(xs) > 1 else 0.0
        # What `health calibrate` would apply after seeing this noise (it widens its own tolerance).
        tol = thresholds.tolerance(check, cv)
        checks[check] = {"median": statistics.median(xs), "unit": units[check], "cv": cv, "min": min(xs), "max": max(xs),
                         "default_tolerance": thresholds.tolerance(check), "tolerance": tol,
                         "tolerance_over_cv": tol / cv if cv else None}
    return {"level": level, "runs": runs, "cores": os.cpu_count(), "load_1min": [load_before, os.getloadavg()[0]],
            "seconds_median": statistics.median(durations),
            "seconds_max": max(durations), "checks": checks}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--levels", default="quick,full")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [bench(level, args.runs) for level in args.levels.split(",")]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(f"level {r['level']}: {r['seconds_median']:.1f} s per pass (max {r['seconds_max']:.1f} s, {r['runs']} runs; "
              f"load average {r['load_1min'][0]:.1f} -> {r['load_1min'][1]:.1f} on {r['cores']} cores)")
        print(f"  {'check':28} {'median':>10} {'unit':8} {'CV':>7} {'min/max':>8} {'tol':>5} {'calib':>6} {'tol/CV':>7}")
        for check, c in r["checks"].items():
            ratio = f"{c['tolerance_over_cv']:.1f}" if c["tolerance_over_cv"] else "-"
            print(f"  {check:28} {c['median']:10.4g} {c['unit']:8} {c['cv']:7.1%} {c['min'] / c['max']:8.2f} "
                  f"{c['default_tolerance']:5.0%} {c['tolerance']:6.0%} {ratio:>7}")
    if len(results) == 2:
        quick, full = results
        print(f"full / quick wall time: {full['seconds_median'] / quick['seconds_median']:.1f}x")
        for check in quick["checks"].keys() & full["checks"].keys():
            print(f"  {check}: full / quick median {full['checks'][check]['median'] / quick['checks'][check]['median']:.2f}")


if __name__ == "__main__":
    main()
