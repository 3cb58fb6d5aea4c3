"""A `Layout` placed on a world of ranks, and the device mesh it names.

Every degree and choice comes from the layout (`parallel.layout`): this module adds only
what needs the world, the mesh. It has torchtitan's dimension order, outermost (slowest
links) first: `pp, dp_replicate, dp_shard, cp, tp`. Tensor parallelism, the most talkative,
sits on neighbouring ranks (one node); pipeline stages, the quietest, span nodes. Flattened views:

- `dp`          (dp_replicate, dp_shard): ranks that see different data (the sampler's group)
- `dp_shard_cp` (dp_shard, cp): what FSDP shards over; cp ranks hold the same weights and
                their gradients are averaged with the data-parallel ones
- `dp_cp`       (dp_replicate, dp_shard, cp): the ranks a loss (and, unsharded, a gradient) is averaged over
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from supercluster.errors import UserError
from supercluster.parallel.layout import Layout

# torch 2.13 still slices flattened dims from the root mesh (mesh["dp"]), torchtitan's way,
# but warns on every slice that a later release may want them kept separately.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")


@dataclass
class ParallelDims:
    layout: Layout
    world_size: int

    @classmethod
    def of(cls, layout: Layout, world_size: int, model, seq_len: int, global_batch: int,
           gpus_per_node: int | None = None) -> "ParallelDims":
        """The layout checked against the model and the world it must fill exactly."""
        if layout.gpus != world_size and min(layout.tp, layout.pp, layout.dp, layout.cp) >= 1:
            raise UserError(
                f"dp_replicate*dp_shard*tp*pp*cp = {layout.gpus} but the job has {world_size} ranks; "
                f"make the degrees multiply to the number of ranks."
            )
        layout.validate(model, seq_len, global_batch, gpus_per_node)
        return cls(layout, world_size)

    def __getattr__(self, name):
        # Degrees, schedule and stage questions are the layout's: one vocabulary.
        if name == "layout":
            raise AttributeError(name)
        return getattr(self.layout, name)

    @property
    def fsdp(self) -> int:
        """Ranks FSDP shards the weights over (cp ranks hold the same weights, so they shard too)."""
        return self.dp_shard * self.cp

    @property
    def sharded(self) -> bool:
        """FSDP2 holds the weights (full or keep_gathered); else replicas with an all-reduce."""
        return self.layout.sharding != "none"

    def build_mesh(self, device_type: str):
        """One named DeviceMesh over the world (every dimension, size 1 included), with its flattened views."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep > 1:  # dp_shard split as (dp_shard_mod_ep, ep): expert-parallel ranks are neighbours
            names = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")
            sizes = (self.pp, self.dp_replicate, self.expert_shard, self.ep, self.cp, self.tp)
            shard = ("dp_shard_mod_ep", "ep")
        else:
            names = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
            sizes = tuple(getattr(self, n) for n in names)
            shard = ("dp_shard",)
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=names)
        if self.ep > 1:
            mesh[shard]._flatten("dp_shard")
        mesh["dp_replicate", *shard]._flatten("dp")
        mesh[(*shard, "cp")]._flatten("dp_shard_cp")
        mesh["dp_replicate", *shard, "cp"]._flatten("dp_cp")
        return mesh

    def expert_fsdp_mesh(self, mesh):
        """What FSDP shards the experts over under expert parallelism: the data-parallel ranks
        left after ep (dp_shard/ep, with dp_replicate for HSDP)."""
        if self.dp_replicate > 1:
            return mesh["dp_replicate", "dp_shard_mod_ep"]
        return mesh["dp_shard_mod_ep"]

    def dp_mesh(self, mesh):
        """The (flattened) data-parallel sub-mesh, or None when there is no data parallelism."""
        if mesh is None or self.dp == 1:
            return None
        return mesh["dp"]

    def fsdp_mesh(self, mesh):
        """What fully_shard runs on: (dp_replicate, dp_shard_cp) for HSDP, else dp_shard_cp;
        None when nothing is sharded."""
        if mesh is None or not self.sharded or self.dp_replicate * self.fsdp == 1:
            return None
        if self.dp_replicate > 1:
            return mesh["dp_replicate", "dp_shard_cp"]
        return mesh["dp_shard_cp"]

    def replica_mesh(self, mesh):
        """Unsharded layouts: the ranks whose gradients are all-reduced (data and context parallel)."""
        if mesh is None or self.sharded or self.dp * self.cp == 1:
            return None
        return mesh["dp_cp"]
