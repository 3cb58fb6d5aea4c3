"""Trainer throughput against a minimal plain-PyTorch loop of the same model and batch.

Both run in this process, one after the other, on the same data and thread count; the
ratio (trainer / plain) is what to read, since absolute numbers depend on the machine.

    .venv/bin/python bench/train_throughput.py [--preset small] [--steps 12]
"""

import argparse
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
from supercluster.train.trainer import Trainer


def plain_loop(cfg, data, steps: int) -> list[float]:
    """nanoGPT's loop, nothing more: forward, backward, AdamW, with gradient accumulation."""
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
            loss = F.cross_entropy(model(x[sl]).flatten(0, 1), y[sl].flatten()) / accum
            loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - tic)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config("configs/demo.toml", [f"model.preset={args.preset}", f"train.steps={args.steps}",
                                                f"run.dir={run_dir}", "train.eval_every=0", "train.checkpoint_every=0",
                                                "train.max_minutes=100"])
        data = prepare_data(cfg.data.path, cfg.model_config().vocab_size, max_mb=cfg.data.max_mb)
        trainer = Trainer(cfg)
        step_times = []
        for _ in range(args.steps):
            tic = time.perf_counter()
            trainer.train_step()
            step_times.append(time.perf_counter() - tic)
        plain_times = plain_loop(cfg, data, args.steps)

    tokens = cfg.train.global_batch * cfg.train.seq_len
    fpt = flops_per_token(cfg.model_config(), cfg.train.seq_len)
    peak = device_peak(torch.device("cpu"), trainer.precision)
    rows = []
    for name, times in (("supercluster trainer", step_times), ("plain PyTorch loop", plain_times)):
        tps = tokens / statistics.median(times[args.warmup:])
        rows.append((name, tps, fpt * tps / (peak.tflops * 1e12)))
    print(f"model {args.preset}, {tokens} tokens/step, {torch.get_num_threads()} threads, "
          f"precision {trainer.precision}, peak {peak.tflops * 1e3:.0f} GFLOP/s ({peak.source})")
    for name, tps, mfu in rows:
        print(f"{name:22s} {tps:10,.0f} tokens/s   MFU {100 * mfu:5.1f}%")
    print(f"ratio trainer/plain: {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
