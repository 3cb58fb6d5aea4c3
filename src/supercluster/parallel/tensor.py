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
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
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
