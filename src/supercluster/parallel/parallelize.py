"""One `parallelize(model, dims, mesh, cfg)`: how a model (or one pipeline stage of it) is
spread over its device mesh.

Applied in torchtitan's order: tensor/sequence parallel, context parallel attention,
activation checkpointing, compile, then FSDP2 per block and at the root (HSDP when
dp_replicate > 1). Each step keeps parameter names, so checkpoints reshard across layouts.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from supercluster.parallel.context import SequenceSharding
from supercluster.parallel.dims import ParallelDims
from supercluster.parallel.tensor import apply_tensor_parallel


def parallelize(model: torch.nn.Module, dims: ParallelDims, mesh, train_cfg, sequence: SequenceSharding | None = None,
                precision: str = "fp32") -> torch.nn.Module:
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if sequence is not None:
        sequence.attach(model)
    if train_cfg.recompute != "none":
        apply_activation_checkpointing(model, train_cfg.recompute)
    if train_cfg.compile:
        for block in model.layers.values():
            block.compile()  # in place: parameter names stay as they are
    fsdp_mesh = dims.fsdp_mesh(mesh)
    if fsdp_mesh is not None:
        # Parameters in the compute dtype, gradients reduced in fp32 whatever it is: the sum
        # over many ranks is where bf16 rounding would hurt.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                      reduce_dtype=torch.float32)
        # A pipeline runs several microbatches per step through each stage: keep the
        # gathered weights between them instead of gathering again for every one.
        reshard = dims.pp == 1
        for block in model.layers.values():
            fully_shard(block, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    return model


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Recompute activations in backward instead of keeping them: every block ("full"), or
    all but the matmul and attention outputs ("selective", cheap to recompute, most of the memory)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    kwargs = {"preserve_rng_state": False}
    if mode == "selective":
        keep = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten._scaled_dot_product_flash_attention.default,
                torch.ops.aten._scaled_dot_product_efficient_attention.default,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

        def policy(ctx, op, *args, **kw):
            return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = lambda: create_selective_checkpoint_contexts(policy)
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, **kwargs)
