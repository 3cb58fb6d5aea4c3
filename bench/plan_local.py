"""Does the planner predict this machine? Plan the demo model with `--gpu local`, emit the
config, train it briefly with `supercluster train`, and compare the step times.

    python bench/plan_local.py [--steps 12] [--nproc 2]

Target: predicted step time within 25% of the trainer's measured median step
time (steps after the first few, which include warm-up).

The planner is only as right as the matmul rate it is given, and a shared or virtual
machine's rate drifts by tens of percent from one minute to the next. So the rate is
measured the way the ranks will meet it: `nproc` processes at once, each on its share of the
cores, sustained for a few seconds (not a best-of burst), right before the training and again
right after it. The plan is made with the rate before (the config it emits is what trains),
and evaluated again with the mean of both; the spread of the two says how much the machine
moved meanwhile. A single-rank case (no contention, no collectives) follows as a control.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"
WARMUP_STEPS = 3
PROBE_S = 3.0

# One rank's share of the machine: matmuls on its threads for PROBE_S seconds, FLOPs over wall time.
PROBE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n, seconds = 1024, float(sys.argv[2])
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
count, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    a @ b
    count += 1
print(2 * n**3 * count / (time.perf_counter() - start) / 1e12)
"""


def supercluster(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "supercluster.cli.main", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"supercluster {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def concurrent_matmul_tflops(nproc: int, threads: int) -> float:
    """Mean sustained fp32 matmul TFLOP/s of `nproc` processes running at the same time."""
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, str(threads), str(PROBE_S)], stdout=subprocess.PIPE, text=True)
             for _ in range(nproc)]
    return statistics.mean(float(p.communicate()[0]) for p in procs)


def plan(nproc: int, train: dict, preset: str, steps: int, run_dir: Path, config: Path | None) -> dict:
    args = ["plan", preset, "--gpu", "local", "--gpus", str(nproc), "--seq-len", str(train["seq_len"]),
            "--global-batch", str(train["global_batch"]), "--microbatch", str(train["micro_batch"]), "--json"]
    if config is not None:
        args += ["--steps", str(steps), "--run-dir", str(run_dir), "--emit-config", str(config)]
    return json.loads(supercluster(*args))["plans"][0]


def case(nproc: int, steps: int, train: dict, preset: str) -> None:
    from supercluster.hardware import local

    threads = max(1, (os.cpu_count() or 1) // nproc)
    train = dict(train, global_batch=train["micro_batch"] * nproc * 2)  # two microbatches per rank
    with tempfile.TemporaryDirectory() as tmp:
        config, run_dir = Path(tmp) / "plan.toml", Path(tmp) / "run"
        before = concurrent_matmul_tflops(nproc, threads)
        local.save_peak("fp32", before, threads)
        first = plan(nproc, train, preset, steps, run_dir, config)
        # No --nproc: the emitted config carries its launch size ([launch]), as the printed command relies on.
        summary = supercluster("train", str(config), "--no-sample", "--json",
                     "--set", "train.eval_every=100000", "--set", "train.checkpoint_every=100000",
                     "--set", "train.warmup_steps=1")
        after = concurrent_matmul_tflops(nproc, threads)
        local.save_peak("fp32", (before + after) / 2, threads)
        around = plan(nproc, train, preset, steps, run_dir, None)
        summary = json.loads(summary.strip().splitlines()[-1])
        steps_seen = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [m["step_time_s"] for m in steps_seen if "step_time_s" in m][WARMUP_STEPS:]
    if not times:
        sys.exit(f"no step times after {WARMUP_STEPS} warm-up steps")
    measured = statistics.median(times)
    print(f"{nproc} rank(s) x {threads} thread(s): tp{first['tp']} pp{first['pp']} dp{first['dp']} mb{first['microbatch']} "
          f"{first['sharding']}, global batch {train['global_batch']}")
    print(f"  matmul rate per rank, {nproc} at once: {before * 1e3:.1f} GFLOP/s before, {after * 1e3:.1f} after "
          f"({100 * (after / before - 1):+.0f}%)")
    print(f"  measured median step {measured:.3f} s over {len(times)} steps "
          f"(the run's own summary: {summary['measured_step_time_s']:.3f} s measured, "
          f"{summary['predicted_step_time_s']:.3f} s predicted)")
    for label, p in (("rate before (the emitted plan)", first), ("mean rate around the run", around)):
        ratio = p["step_time_s"] / measured
        verdict = "within" if abs(ratio - 1) <= 0.25 else "OUTSIDE"
        print(f"  predicted with the {label}: {p['step_time_s']:.3f} s, predicted/measured = {ratio:.2f} ({verdict} the 25% target)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    # The probes below record this minute's sustained rate as the peak the planner reads; keep
    # that out of the user's cache (~/.supercluster), where the best rate ever seen belongs.
    os.environ["SUPERCLUSTER_HOME"] = tempfile.mkdtemp(prefix="plan-local-")
    demo = tomllib.loads(DEMO.read_text())
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; model {demo['model']['preset']}, "
          f"seq {demo['train']['seq_len']}, micro-batch {demo['train']['micro_batch']}")
    case(args.nproc, args.steps, demo["train"], demo["model"]["preset"])
    if args.nproc > 1:
        case(1, args.steps, demo["train"], demo["model"]["preset"])


if __name__ == "__main__":
    main()
