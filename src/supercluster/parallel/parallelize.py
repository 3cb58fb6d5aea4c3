"""One `parallelize(model, dims, mesh, ...)`: how a model (or one pipeline stage of it) is
spread over its device mesh, exactly as its `Layout` says.

Applied in torchtitan's order: tensor (and, if the layout asks, sequence) parallel, context
parallel attention, activation checkpointing, compile, then the sharding strategy:
- "full":          FSDP2 per block and at the root, reshard_after_forward=True
- "keep_gathered": the same with reshard_after_forward=False (gathered once for forward and backward)
- "none":          no FSDP; replicas whose gradients the trainer all-reduces (`all_reduce_gradients`)
HSDP when dp_replicate > 1. Expert parallelism (`parallel.experts`) comes after tensor
parallelism: MoE experts sharded over the ep ranks, then FSDP-sharded over what is left of dp_shard. Each step keeps parameter names, so checkpoints reshard across layouts.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from supercluster.parallel.context import SequenceSharding
from supercluster.parallel.dims import ParallelDims
from supercluster.parallel.experts import apply_expert_parallel
from supercluster.parallel.tensor import apply_tensor_parallel


def parallelize(model: torch.nn.Module, dims: ParallelDims, mesh, sequence: SequenceSharding | None = None,
                precision: str = "fp32", compile: bool = False) -> torch.nn.Module:
    if dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], dims.sequence_parallel)
    experts = apply_expert_parallel(model, mesh["ep"]) if dims.ep > 1 else []
    if sequence is not None:
        sequence.attach(model)
    if dims.recompute != "none":
        apply_activation_checkpointing(model, dims.recompute)
    if compile:
        for block in model.layers.values():
            block.compile()  # in place: parameter names stay as they are
    fsdp_mesh = dims.fsdp_mesh(mesh)
    if fsdp_mesh is not None:
        # Parameters in the compute dtype, gradients reduced in fp32 whatever it is: the sum
        # over many ranks is where bf16 rounding would hurt.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                      reduce_dtype=torch.float32)
        reshard = dims.sharding == "full"
        for module in experts:  # their own FSDP first, on the ranks left after ep; the block's skips them
            fully_shard(module, mesh=dims.expert_fsdp_mesh(mesh), mp_policy=policy, reshard_after_forward=reshard)
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
        for name in ("_scaled_dot_product_cudnn_attention", "_scaled_mm"):  # cuDNN attention (H100), FP8 GEMMs
            if hasattr(torch.ops.aten, name):
                keep.add(getattr(torch.ops.aten, name).default)

        def policy(ctx, op, *args, **kw):
            return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = lambda: create_selective_checkpoint_contexts(policy)
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, **kwargs)


def all_reduce_gradients(parts: list[torch.nn.Module], group_mesh) -> None:
    """Sharding "none": average every gradient over the replicas (data and context parallel
    ranks), one all-reduce per tensor after the step's last backward, as DDP without buckets."""
    import torch.distributed as dist

    if group_mesh is None:
        return
    group, n = group_mesh.get_group(), group_mesh.size()
    for part in parts:
        for p in part.parameters():
            if p.grad is None:
                continue
            local = getattr(p.grad, "_local_tensor", p.grad)  # a tp-sharded DTensor: this rank's shard
            dist.all_reduce(local, group=group)
            local.div_(n)
