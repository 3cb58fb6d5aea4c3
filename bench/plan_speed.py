"""How fast `supercluster plan` answers a full search, process start included.

    python bench/plan_speed.py

Targets (issue 4): GPT-3 175B on 1024 GPUs under 1 s; a 1T model on 16,384 GPUs under 5 s.
Each case runs the real command in a fresh process (best of a few runs, since other work on
the machine adds noise), and the bare interpreter start is measured in the same run as the
reference the figures are compared with.
"""

import subprocess
import sys
import time

CASES = [
    ("GPT-3 175B, 1024 x A100", ["gpt3-175b", "--gpus", "1024", "--gpu", "a100-80gb", "--global-batch", "1536"], 1.0),
    (
        "1T (128 x 25600, 160 heads), 16384 x H100",
        ["--layers", "128", "--hidden", "25600", "--heads", "160", "--vocab", "51200", "--seq-len", "2048",
         "--global-batch", "8192", "--gpus", "16384", "--gpu", "h100"],
        5.0,
    ),
]
REPEATS = 3


def best_of(argv: list[str]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    python = best_of([sys.executable, "-c", "pass"])
    print(f"reference: bare python start {python:.3f} s")
    for name, args, target in CASES:
        argv = [sys.executable, "-m", "supercluster.cli.main", "plan", *args, "--json"]
        seconds = best_of(argv)
        verdict = "meets" if seconds < target else "MISSES"
        print(f"{name}: {seconds:.3f} s ({seconds / python:.1f}x python start), target < {target:.0f} s: {verdict}")


if __name__ == "__main__":
    main()
