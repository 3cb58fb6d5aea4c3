"""One `parallelize(model, dims, mesh, cfg)`: how a model is spread over its device mesh.

Applied in torchtitan's order: tensor/sequence parallel, activation checkpointing,
compile, then FSDP2 per block and at the root.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from supercluster.parallel.dims import ParallelDims


def parallelize(model: torch.nn.Module, dims: ParallelDims, mesh, train_cfg) -> torch.nn.Module:
    if train_cfg.compile:
        for name, block in model.layers.items():
            model.layers[name] = torch.compile(block)
    if dims.dp > 1:
        # Gradients are reduced in fp32 whatever the compute precision: the sum over many
        # ranks is where bf16 rounding would hurt.
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        dp_mesh = dims.dp_mesh(mesh)
        for block in model.layers.values():
            fully_shard(block, mesh=dp_mesh, mp_policy=policy)
        fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    return model
