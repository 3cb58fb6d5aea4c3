"""Trainer throughput against a minimal plain-PyTorch loop of the same model and batch.

Both run in this process, a step of each in turn, on the same data and thread count, and at
the same precision: the like-for-like ratio (trainer / plain) is what to read, since absolute
numbers depend on the machine. The trainer's automatic precision (`train.precision = auto`:
bf16 where the CPU runs it faster) is reported apart, against the plain loop in fp32, as the
speed-up a user gets from it; a bf16 trainer against an fp32 loop is not a measure of the
trainer's overhead.

    .venv/bin/python bench/train_throughput.py [--preset small] [--steps 12] [--precisions fp32,bf16]
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from supercluster.data import BatchSampler, prepare_data
from supercluster.model.config import flops_per_token
from supercluster.model.transformer import Transformer
from supercluster.train.config import load_config
from supercluster.train.metrics import device_peak
from supercluster.hardware.device import resolve_precision
from supercluster.train.trainer import Trainer


class PlainLoop:
    """nanoGPT's loop, nothing more: forward (under bf16 autocast for bf16, as nanoGPT does),
    backward, AdamW, with gradient accumulation."""

    def __init__(self, cfg, data, precision: str):
        t = cfg.train
        torch.manual_seed(0)
        self.model = Transformer(cfg.model_config())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr)
        self.sampler = BatchSampler(data.train, t.seq_len, t.global_batch, seed=0)
        self.micro, self.accum, self.precision = t.micro_batch, t.global_batch // t.micro_batch, precision

    def step(self) -> None:
        x, y = self.sampler.next()
        for i in range(self.accum):
            sl = slice(i * self.micro, (i + 1) * self.micro)
            with torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext():
                logits = self.model(x[sl])
            loss = F.cross_entropy(logits.float().flatten(0, 1), y[sl].flatten()) / self.accum
            loss.backward()
        self.opt.step()
        self.opt.zero_grad()


def timed(step) -> float:
    tic = time.perf_counter()
    step()
    return time.perf_counter() - tic


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated, e.g. fp32,bf16 (default: fp32 and the automatic choice)")
    parser.add_argument("--json", action="store_true", help="one line of tokens/s (used for one precision per process)")
    args = parser.parse_args()
    auto = resolve_precision(torch.device("cpu"), "auto")
    precisions = args.precisions.split(",") if args.precisions else sorted({"fp32", auto})
    base = [f"model.preset={args.preset}", f"train.steps={args.steps}", "train.eval_every=0",
            "train.checkpoint_every=0", "train.max_minutes=100"]
    if len(precisions) > 1:
        # One process per precision: after bf16 work, fp32 in the same process ran several times
        # slower here (both loops alike), which would make the order of the runs the result.
        tps = {}
        for precision in precisions:
            out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--precisions", precision, "--json"],
                                 check=True, capture_output=True, text=True).stdout
            tps.update({(who, precision): rate for who, rate in json.loads(out.splitlines()[-1]).items()})
        report(args, auto, precisions, tps)
        return
    precision = precisions[0]
    times: dict[str, list[float]] = {"trainer": [], "plain": []}
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config("configs/demo.toml", [*base, f"run.dir={run_dir}", f"train.precision={precision}"])
        data = prepare_data(cfg.data.path, cfg.model_config().vocab_size, max_mb=cfg.data.max_mb)
        trainer, plain = Trainer(cfg), PlainLoop(cfg, data, precision)
        # Step by step in turn, so that other work on a shared machine slows both alike.
        for _ in range(args.steps):
            times["trainer"].append(timed(trainer.train_step))
            times["plain"].append(timed(plain.step))
    tokens = cfg.train.global_batch * cfg.train.seq_len
    tps = {(who, precision): tokens / statistics.median(t[args.warmup:]) for who, t in times.items()}
    if args.json:
        print(json.dumps({who: rate for (who, _), rate in tps.items()}))
        return
    report(args, auto, precisions, tps)


def report(args, auto: str, precisions: list[str], tps: dict) -> None:
    cfg = load_config("configs/demo.toml", [f"model.preset={args.preset}"])
    tokens = cfg.train.global_batch * cfg.train.seq_len
    fpt = flops_per_token(cfg.model_config(), cfg.train.seq_len)
    print(f"model {args.preset}, {tokens} tokens/step, {torch.get_num_threads()} threads, "
          f"automatic precision here: {auto}")
    for precision in precisions:
        peak = device_peak(torch.device("cpu"), precision)
        print(f"{precision}: peak {peak.tflops * 1e3:.0f} GFLOP/s ({peak.source})")
        for who, name in (("trainer", "supercluster trainer"), ("plain", "plain PyTorch loop")):
            rate = tps[who, precision]
            print(f"  {name:22s} {rate:10,.0f} tokens/s   MFU {100 * fpt * rate / (peak.tflops * 1e12):5.1f}%")
        print(f"  like-for-like ratio trainer/plain ({precision}): {tps['trainer', precision] / tps['plain', precision]:.2f}")
    if ("trainer", auto) in tps and ("plain", "fp32") in tps:
        print(f"automatic choice: trainer at {auto} / plain loop at fp32: "
              f"{tps['trainer', auto] / tps['plain', 'fp32']:.2f} (precision's gain, not the trainer's overhead)")


if __name__ == "__main__":
    main()
