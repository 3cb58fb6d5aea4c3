"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule.

The schedule is a pure function of the step, so a checkpoint needs no scheduler state.
"""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, train_cfg, device: torch.device) -> torch.optim.AdamW:
    # Norm gains and biases are not decayed (GPT-2, Llama): they are not weights to shrink.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    # The fused kernel (one launch for all tensors) where torch has it for this device and
    # the parameters are plain tensors; the multi-tensor `foreach` path for DTensors.
    sharded = any(type(p).__name__ == "DTensor" for p in decay)
    fused = not sharded and device.type in ("cpu", "cuda", "xpu", "mps")
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, train_cfg) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
    lr, warmup, total = train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * train_cfg.min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
