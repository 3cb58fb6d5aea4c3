"""Parallel degrees, checked against the world and the model, and the device mesh they name."""

from __future__ import annotations

from dataclasses import dataclass

from supercluster.errors import UserError


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    world_size: int

    @classmethod
    def from_config(cls, par, world_size: int) -> "ParallelDims":
        for name in ("dp_replicate", "tp", "pp", "cp"):
            if getattr(par, name) < 1:
                raise UserError(f"parallel.{name} must be at least 1, got {getattr(par, name)}.")
        fixed = par.dp_replicate * par.tp * par.pp * par.cp
        dp_shard = par.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise UserError(
                    f"The world of {world_size} ranks is not divisible by dp_replicate*tp*pp*cp = {fixed}; "
                    f"change the degrees or the number of ranks."
                )
            dp_shard = world_size // fixed
        if dp_shard < 1:
            raise UserError(f"parallel.dp_shard must be at least 1 (or -1 for the rest), got {dp_shard}.")
        dims = cls(par.dp_replicate, dp_shard, par.tp, par.pp, par.cp, world_size)
        if dims.product != world_size:
            raise UserError(
                f"dp_replicate*dp_shard*tp*pp*cp = {dims.product} but the job has {world_size} ranks; "
                f"make the degrees multiply to the number of ranks."
            )
        return dims

    @property
    def product(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Ranks that see different data: both data-parallel dimensions."""
        return self.dp_replicate * self.dp_shard

    def validate_model(self, model_cfg, train_cfg) -> None:
        """The divisibility rules every layout must satisfy, each named in its message."""
        if train_cfg.global_batch % (self.dp * train_cfg.micro_batch):
            raise UserError(
                f"train.global_batch ({train_cfg.global_batch}) must be divisible by data-parallel degree "
                f"({self.dp}) x train.micro_batch ({train_cfg.micro_batch})."
            )
        if model_cfg.heads % self.tp or model_cfg.kv_heads % self.tp:
            raise UserError(
                f"Tensor parallel degree {self.tp} must divide the heads ({model_cfg.heads}) "
                f"and kv-heads ({model_cfg.kv_heads})."
            )
        if train_cfg.seq_len % (self.cp * (2 if self.cp > 1 else 1)):
            raise UserError(f"train.seq_len ({train_cfg.seq_len}) must be divisible by 2 x cp ({self.cp}).")

    def build_mesh(self, device_type: str):
        """One named DeviceMesh over the world, with the flattened `dp` dimension for data loading."""
        from torch.distributed.device_mesh import init_device_mesh

        names, sizes = [], []
        for name, size in (("pp", self.pp), ("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard),
                           ("cp", self.cp), ("tp", self.tp)):
            if size > 1:
                names.append(name)
                sizes.append(size)
        if not names:
            return None
        mesh = init_device_mesh(device_type, tuple(sizes), mesh_dim_names=tuple(names))
        dp_names = tuple(n for n in ("dp_replicate", "dp_shard") if n in names)
        if len(dp_names) > 1:
            mesh[dp_names]._flatten("dp")
        return mesh

    def dp_mesh(self, mesh):
        """The (flattened) data-parallel sub-mesh, or None when there is no data parallelism."""
        if mesh is None or self.dp == 1:
            return None
        if self.dp_replicate > 1 and self.dp_shard > 1:
            return mesh["dp"]
        return mesh["dp_shard" if self.dp_shard > 1 else "dp_replicate"]
