"""Pipeline parallelism: the model cut by layers into stages, run by a torch schedule.

Stage s holds the layers the layout gives it (`Layout.layer_ranges`: explicit
`stage_layers`, uneven allowed, or the balanced split); the first also holds the embedding,
the last the final norm and the head. Each pipeline rank holds one stage (GPipe, 1F1B), several in
a loop (interleaved schedules: rank r holds r, r+pp, r+2pp, ...), or two in a V (ZBV,
DualPipeV: rank r holds r and 2pp-1-r). Stages are the model with the other layers
deleted, so every parameter keeps its full name and checkpoints move between layouts.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from supercluster.parallel.dims import ParallelDims
from supercluster.parallel.layout import PP_SCHEDULES


def split_model(model: torch.nn.Module, dims: ParallelDims, pp_rank: int) -> list[tuple[int, torch.nn.Module]]:
    """This rank's stages as (stage index, module) pairs, carved out of the full model."""
    ids, last = dims.stage_ids(pp_rank), dims.num_stages - 1
    ranges = dims.layout.layer_ranges(model.cfg)
    parts = [(sid, model if len(ids) == 1 else copy.deepcopy(model)) for sid in ids]
    for sid, part in parts:
        keep = {str(i) for i in ranges[sid]}
        for name in [n for n in part.layers if n not in keep]:
            del part.layers[name]
        if sid != 0:
            part.tok_embeddings = None
            part.pos_embeddings = None
        if sid != last:
            part.norm = None
            part.output = None
    return parts


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_schedule(parts: list[tuple[int, torch.nn.Module]], dims: ParallelDims, pp_mesh, device,
                   microbatches: int, loss_fn=cross_entropy):
    """The configured torch.distributed.pipelining schedule over this rank's stages.

    The schedule averages gradients over microbatches (scale_grads), so a step's gradient is
    the mean over the batch as in a plain loop.
    """
    stages = [PipelineStage(part, sid, dims.num_stages, device, group=pp_mesh.get_group()) for sid, part in parts]
    schedule_class = get_schedule_class(PP_SCHEDULES[dims.pp_schedule])
    if issubclass(schedule_class, PipelineScheduleSingle):
        return schedule_class(stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
    return schedule_class(stages, n_microbatches=microbatches, loss_fn=loss_fn)
