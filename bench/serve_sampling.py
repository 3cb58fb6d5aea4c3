"""The sampler's draw against `torch.multinomial`, same process, same weights (a softmax over
SmolLM2's 49,152-token vocabulary), interleaved rounds: milliseconds per sampled token.

    PYTHONPATH=src .venv/bin/python bench/serve_sampling.py [--vocab 49152] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from supercluster.hardware.local import cpu_model
from supercluster.model.transformer import draw


def per_draw_ms(pick, rounds: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        pick()
    return (time.perf_counter() - start) * 1e3 / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probs = torch.softmax(torch.randn(args.vocab, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    gen = torch.Generator().manual_seed(1)
    ways = {"torch.multinomial": lambda: int(torch.multinomial(probs / probs.sum(), 1, generator=gen)),
            "draw (inverse CDF)": lambda: draw(probs, gen)}
    times = {name: [] for name in ways}
    for _ in range(5):  # interleaved: the machine's drift falls on both
        for name, pick in ways.items():
            pick()
            times[name].append(per_draw_ms(pick))
    print(f"CPU: {cpu_model()}, {args.threads} threads, vocabulary {args.vocab}")
    for name, ms in times.items():
        print(f"{name:20} {statistics.median(ms):.3f} ms per token (median of 5 rounds)")
    print(f"ratio: {statistics.median(times['torch.multinomial']) / statistics.median(times['draw (inverse CDF)']):.1f}x")


if __name__ == "__main__":
    main()
