"""Mixture-of-Experts training cost on this CPU, against a dense model of the same active size.

1. Training tokens/s (forward, backward, AdamW step; fp32) of a `tiny-moe`-shaped model (8
   experts, top-2, layer 0 dense) against the dense model whose FFN is as wide as the two
   experts a token uses (`ffn_hidden = top_k * moe_hidden`): the same active parameters, so the
   ratio is what routing and dispatch cost.
2. Where a MoE layer's time goes, forward and backward of each part on the same tokens:
   routing (router linear, fp32 scores, top-k), dispatch and combine (sort by expert, gather,
   weighted scatter-add) and the expert matmuls.
3. The expert matmuls by `torch._grouped_mm` against the per-expert loop, fp32 and bf16.

Everything runs in one process, one after another, so the ratios compare like with like; the
absolute numbers move with the machine's load (printed with the results).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from supercluster.hardware.local import cpu_model
from supercluster.model.config import ModelConfig, active_params, num_params
from supercluster.model.moe import GroupedExperts, MoE, grouped_mm_works
from supercluster.model.transformer import Transformer

SHAPE = dict(layers=4, hidden=256, heads=8, kv_heads=4, vocab_size=2048, max_seq_len=256)
MOE = dict(moe_experts=8, moe_top_k=2, moe_hidden=256, moe_dense_layers=1, moe_aux_loss_coef=0.01, ffn_hidden=512)


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def train_tokens_per_s(cfg: ModelConfig, batch: int, seq: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch * seq / timed(step, repeats)


def breakdown(cfg: ModelConfig, tokens: int, repeats: int) -> dict[str, float]:
    """Seconds of forward + backward of each part of one MoE layer on `tokens` tokens."""
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, cfg.hidden, requires_grad=True)
    k = cfg.moe_top_k
    weights, experts, _ = moe.router(x)
    flat = experts.flatten()
    counts = torch.bincount(flat, minlength=cfg.moe_experts)
    order = torch.argsort(flat, stable=True)
    routed = x.detach()[order // k].requires_grad_()
    expert_out = moe.experts(routed, counts).detach().requires_grad_()

    def routing():
        w, _, scores = moe.router(x)
        (w.sum() + scores.square().sum()).backward()

    def dispatch():
        f = experts.flatten()
        o = torch.argsort(f, stable=True)
        rows = o // k
        gathered = x[rows]
        out = (expert_out + gathered[:, :1] * 0) * weights.detach().flatten()[o, None]
        torch.zeros(x.shape).index_add_(0, rows, out).square().sum().backward()

    def matmul():
        moe.experts(routed, counts).square().sum().backward()

    return {name: timed(fn, repeats) for name, fn in (("routing", routing), ("dispatch+combine", dispatch),
                                                      ("expert matmul", matmul))}


def grouped_vs_loop(dtype: torch.dtype, tokens: int, repeats: int) -> dict[str, float]:
    cfg = ModelConfig(**SHAPE, **MOE)
    torch.manual_seed(0)
    experts = GroupedExperts(cfg.moe_experts, cfg.hidden, cfg.moe_hidden).to(dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    counts = torch.bincount(torch.randint(0, cfg.moe_experts, (tokens * cfg.moe_top_k,)), minlength=cfg.moe_experts)
    x = torch.randn(int(counts.sum()), cfg.hidden, dtype=dtype, requires_grad=True)
    out = {}
    for name, grouped in (("grouped_mm", True), ("per-expert loop", False)):
        experts.use_grouped_mm = grouped

        def run():
            experts(x, counts).float().square().sum().backward()

        out[name] = timed(run, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    moe = ModelConfig(**SHAPE, **MOE).validate()
    dense = ModelConfig(**SHAPE, ffn_hidden=moe.moe_top_k * moe.moe_hidden).validate()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"MoE: {num_params(moe):,} parameters, {active_params(moe):,} active; "
          f"dense: {num_params(dense):,} (its layer 0 as the MoE model's, the others {dense.ffn_hidden} wide)")
    t_moe = train_tokens_per_s(moe, args.batch, args.seq, args.repeats)
    t_dense = train_tokens_per_s(dense, args.batch, args.seq, args.repeats)
    print(f"\ntraining, {args.batch}x{args.seq} tokens a step (fp32):")
    print(f"  dense  {t_dense:10.0f} tokens/s")
    print(f"  MoE    {t_moe:10.0f} tokens/s   ratio MoE/dense {t_moe / t_dense:.2f}")
    parts = breakdown(moe, args.batch * args.seq, args.repeats)
    total = sum(parts.values())
    print(f"\none MoE layer, forward + backward on {args.batch * args.seq} tokens:")
    for name, seconds in parts.items():
        print(f"  {name:18s} {seconds * 1e3:8.2f} ms  {100 * seconds / total:5.1f}%")
    print(f"\nexpert matmuls (forward + backward), {args.batch * args.seq} tokens x top-{moe.moe_top_k}:")
    for dtype in (torch.float32, torch.bfloat16):
        works = grouped_mm_works("cpu", dtype)
        got = grouped_vs_loop(dtype, args.batch * args.seq, args.repeats)
        ratio = got["per-expert loop"] / got["grouped_mm"]
        print(f"  {str(dtype):15s} grouped_mm {got['grouped_mm'] * 1e3:8.2f} ms   loop {got['per-expert loop'] * 1e3:8.2f} ms"
              f"   loop/grouped {ratio:.2f}" + ("" if works else "   (grouped_mm does not run here: both are the loop)"))


if __name__ == "__main__":
    main()
