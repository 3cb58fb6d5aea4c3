"""Does the planner predict this machine? Plan the demo model with `--gpu local`, emit the
config, train it briefly with `supercluster train`, and compare the step times.

    python bench/plan_local.py [--steps 12] [--nproc 2]

Target (issue 4): predicted step time within 25% of the trainer's measured median step
time (steps after the first few, which include warm-up). Both the plan and the training run
happen here, in the same run, on the same machine state.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"
WARMUP_STEPS = 3


def supercluster(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "supercluster.cli.main", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"supercluster {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def refresh_local_figures(nproc: int) -> None:
    """Measure this machine's matmul peak (per rank's share of the cores) and memory bandwidth
    now, so that the plan and the training see the same machine state (other work shares it)."""
    import os

    import torch

    from supercluster.hardware import local

    threads = max(1, (os.cpu_count() or 1) // nproc)
    torch.set_num_threads(threads)
    peak = local.measure_matmul_tflops("fp32")
    local.save_peak("fp32", peak, threads)
    bandwidth = local.memory_bandwidth_tbps(refresh=True)
    print(f"load average {os.getloadavg()[0]:.1f}; measured now: fp32 matmul {peak * 1e3:.1f} GFLOP/s with {threads} "
          f"thread(s), memory copy {bandwidth * 1e3:.1f} GB/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    refresh_local_figures(args.nproc)
    demo = tomllib.loads(DEMO.read_text())
    train = demo["train"]
    with tempfile.TemporaryDirectory() as tmp:
        config, run_dir = Path(tmp) / "plan.toml", Path(tmp) / "run"
        plans = json.loads(supercluster(
            "plan", demo["model"]["preset"], "--gpu", "local", "--gpus", str(args.nproc),
            "--seq-len", str(train["seq_len"]), "--global-batch", str(train["global_batch"]),
            "--microbatch", str(train["micro_batch"]), "--steps", str(args.steps), "--run-dir", str(run_dir),
            "--emit-config", str(config), "--json",
        ))["plans"]
        best = plans[0]
        print(f"plan: tp{best['tp']} pp{best['pp']} dp{best['dp']} cp{best['cp']} mb{best['microbatch']} zero{best['zero']}, "
              f"predicted step {best['step_time_s']:.3f} s")
        supercluster("train", str(config), "--nproc", str(args.nproc), "--no-sample", "--json",
                     "--set", "train.eval_every=100000", "--set", "train.checkpoint_every=100000",
                     "--set", "train.warmup_steps=1")
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        times = [m["step_time_s"] for m in steps if "step_time_s" in m][WARMUP_STEPS:]
        if not times:
            sys.exit(f"no step times after {WARMUP_STEPS} warm-up steps in {run_dir / 'metrics.jsonl'}")
        measured = statistics.median(times)
        mfu = statistics.median(m["mfu"] for m in steps[WARMUP_STEPS:] if "mfu" in m)
        print(f"trainer's own MFU (vs its measured matmul peak): {100 * mfu:.1f}%; planned MFU {100 * best['mfu']:.1f}%")
        ratio = best["step_time_s"] / measured
        verdict = "within" if abs(ratio - 1) <= 0.25 else "OUTSIDE"
        print(f"measured median step {measured:.3f} s over {len(times)} steps; predicted/measured = {ratio:.2f} "
              f"({verdict} the 25% target)")


if __name__ == "__main__":
    main()
