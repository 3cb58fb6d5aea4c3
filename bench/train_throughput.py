"""Trainer throughput against a minimal plain-PyTorch loop of the same model and batch.

Both run in this process, one after the other, on the same data and thread count, and at
the same precision: the like-for-like ratio (trainer / plain) is what to read, since absolute
numbers depend on the machine. The trainer's automatic precision (`train.precision = auto`:
bf16 where the CPU runs it faster) is reported apart, against the plain loop in fp32, as the
speed-up a user gets from it; a bf16 trainer against an fp32 loop is not a measure of the
trainer's overhead.

    .venv/bin/python bench/train_throughput.py [--preset small] [--steps 12] [--precisions fp32,bf16]
"""

import argparse
import contextlib
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from supercluster.data import BatchSampler, prepare_data
from supercluster.model.config import flops_per_token
from supercluster.model.transformer import Transformer
from supercluster.train.config import load_config
from supercluster.train.metrics import device_peak
from supercluster.train.trainer import Trainer, resolve_precision


def plain_loop(cfg, data, steps: int, precision: str) -> list[float]:
    """nanoGPT's loop, nothing more: forward (under bf16 autocast for bf16, as nanoGPT does),
    backward, AdamW, with gradient accumulation."""
    t, model_cfg = cfg.train, cfg.model_config()
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr)
    sampler = BatchSampler(data.train, t.seq_len, t.global_batch, seed=0)
    accum = t.global_batch // t.micro_batch
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        x, y = sampler.next()
        for i in range(accum):
            sl = slice(i * t.micro_batch, (i + 1) * t.micro_batch)
            with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
                logits = model(x[sl])
            loss = F.cross_entropy(logits.float().flatten(0, 1), y[sl].flatten()) / accum
            loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - tic)
    return times


def trainer_steps(cfg, steps: int) -> tuple[list[float], str]:
    trainer = Trainer(cfg)
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - tic)
    return times, trainer.precision


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated, e.g. fp32,bf16 (default: fp32 and the automatic choice)")
    args = parser.parse_args()
    auto = resolve_precision(torch.device("cpu"), "auto")
    precisions = args.precisions.split(",") if args.precisions else sorted({"fp32", auto})
    base = [f"model.preset={args.preset}", f"train.steps={args.steps}", "train.eval_every=0",
            "train.checkpoint_every=0", "train.max_minutes=100"]
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config("configs/demo.toml", [*base, f"run.dir={run_dir}"])
        data = prepare_data(cfg.data.path, cfg.model_config().vocab_size, max_mb=cfg.data.max_mb)
        for precision in precisions:
            cfg = load_config("configs/demo.toml", [*base, f"run.dir={run_dir}/{precision}", f"train.precision={precision}"])
            times["trainer", precision], _ = trainer_steps(cfg, args.steps)
            times["plain", precision] = plain_loop(cfg, data, args.steps, precision)

    tokens = cfg.train.global_batch * cfg.train.seq_len
    fpt = flops_per_token(cfg.model_config(), cfg.train.seq_len)
    tps = {key: tokens / statistics.median(t[args.warmup:]) for key, t in times.items()}
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
