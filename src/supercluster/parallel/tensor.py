"""Tensor and sequence parallelism (Megatron-style, on DTensor), as torchtitan applies it.

Inside a block, the attention and MLP input projections are split by columns (heads and
hidden units) and the output projections by rows, so each block needs one all-gather in
and one reduce-scatter out per sub-layer. Between them the residual stream stays sharded
along the sequence (sequence parallelism): norms run on a slice of the tokens, and the
activations held for backward shrink by tp. Without sequence parallelism the residual
stream is replicated instead: each output projection all-reduces, norms run on every
token on every tp rank (more memory, the same bytes on the wire). The embedding is split by vocabulary rows; the
head by vocabulary columns, gathered back to full logits for the loss.

Every module keeps its name, so checkpoints taken here load into any other layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = True) -> None:
    """Shard `model` (a whole Transformer or one pipeline stage of it) over `tp_mesh` in place."""
    if not sequence_parallel:
        _apply_without_sequence_parallel(model, tp_mesh)
        return
    outer = {}
    if model.tok_embeddings is not None:
        outer["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "pos_embeddings", None) is not None and model.tok_embeddings is not None:
        # Learned positions [s, hidden] are added to the sequence-sharded embeddings.
        outer["pos_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))
    if model.norm is not None:
        outer["norm"] = SequenceParallel()
    if model.output is not None:
        outer["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True)
    if outer:
        parallelize_module(model, tp_mesh, outer)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # Attention sees the whole (local) sequence: gather the tokens, keep rope and cache as they are.
            # attention(x, rope, cache, document mask): only x is a sequence-sharded activation
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            **({"feed_forward.w3": ColwiseParallel()} if block.feed_forward.w3 is not None else {}),
        })


def _apply_without_sequence_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron's original split: the residual stream replicated on every tp rank."""
    outer = {}
    if model.tok_embeddings is not None:
        outer["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if getattr(model, "pos_embeddings", None) is not None and model.tok_embeddings is not None:
        outer["pos_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.output is not None:
        outer["output"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate(), use_local_output=True)
    if outer:
        parallelize_module(model, tp_mesh, outer)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
            **({"feed_forward.w3": ColwiseParallel()} if block.feed_forward.w3 is not None else {}),
        })


def shard_for_inference(model: nn.Module, rank: int, world: int, group=None) -> None:
    """The same Megatron split on plain tensors, for serving: each rank keeps its slice of every
    projection as an ordinary Linear, and the row-split ones all-reduce their output.

    DTensor's dispatch costs more than the matmuls of a small decode step: on 2 CPU cores it made
    a SmolLM2-sized model's forward 4x slower at one rank. Here the only overhead is the
    collectives themselves. The embeddings stay whole on every rank (no collective in); the
    output head is split by vocabulary and gathered when the vocabulary divides evenly, else
    whole too. Inference only: the weights are copies, and a tied head is untied.
    """
    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        for linear in (attn.wq, attn.wk, attn.wv, ffn.w1, *([ffn.w3] if ffn.w3 is not None else [])):
            _keep_rows(linear, rank, world)
        attn.wo = _RowParallel(attn.wo, rank, world, group)
        ffn.w2 = _RowParallel(ffn.w2, rank, world, group)
    if model.output is not None and model.output.out_features % world == 0:
        model.output = _GatheredColumns(model.output, rank, world, group)


def _keep_rows(linear: nn.Linear, rank: int, world: int) -> None:
    """Column parallelism: this rank's share of the output features."""
    rows = slice(rank * linear.out_features // world, (rank + 1) * linear.out_features // world)
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


class _RowParallel(nn.Module):
    """Row parallelism: this rank's share of the input features; partial products summed over
    the group, the bias added once after the sum."""

    def __init__(self, linear: nn.Linear, rank: int, world: int, group):
        super().__init__()
        cols = slice(rank * linear.in_features // world, (rank + 1) * linear.in_features // world)
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].clone(), requires_grad=False)
        self.bias = linear.bias
        self.group = group

    def forward(self, x):
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class _GatheredColumns(nn.Module):
    """The output head split by vocabulary: each rank's logits, gathered into all of them."""

    def __init__(self, linear: nn.Linear, rank: int, world: int, group):
        super().__init__()
        rows = linear.out_features // world
        self.weight = nn.Parameter(linear.weight.detach()[rank * rows:(rank + 1) * rows].clone(), requires_grad=False)
        self.world, self.group = world, group

    def forward(self, x):
        y = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat(parts, dim=-1)
