"""Parallel degrees, checked against the world and the model, and the device mesh they name.

The mesh has torchtitan's dimension order, outermost (slowest links) first:
`pp, dp_replicate, dp_shard, cp, tp`. Tensor parallelism, the most talkative, sits on
neighbouring ranks (one node); pipeline stages, the quietest, span nodes. Flattened views:

- `dp`          (dp_replicate, dp_shard): ranks that see different data (the sampler's group)
- `dp_shard_cp` (dp_shard, cp): what FSDP shards over; cp ranks hold the same weights and
                their gradients are averaged with the data-parallel ones
- `dp_cp`       (dp_replicate, dp_shard, cp): the ranks a loss is averaged over
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from supercluster.errors import UserError, closest

# torch 2.13 still slices flattened dims from the root mesh (mesh["dp"]), torchtitan's way,
# but warns on every slice that a later release may want them kept separately.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")

# Config names -> torch.distributed.pipelining class names.
PP_SCHEDULES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved1f1b": "Interleaved1F1B",
    "loopedbfs": "LoopedBFS",
    "interleavedzerobubble": "InterleavedZeroBubble",
    "zbvzerobubble": "ZBVZeroBubble",
    "dualpipev": "DualPipeV",
}
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")  # one stage per rank; the others run several
V_SCHEDULES = ("zbvzerobubble", "dualpipev")  # exactly two stages per rank, placed in a V


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    world_size: int
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    microbatches: int | None = None

    @classmethod
    def from_config(cls, par, world_size: int) -> "ParallelDims":
        for name in ("dp_replicate", "tp", "pp", "cp", "virtual_stages"):
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
        schedule = par.pp_schedule.lower().replace("_", "").replace("-", "")
        if schedule not in PP_SCHEDULES:
            raise UserError(f"parallel.pp_schedule {par.pp_schedule!r} is not one of "
                            f"{', '.join(PP_SCHEDULES)}{closest(schedule, PP_SCHEDULES)}.")
        if par.microbatches is not None and par.microbatches < 1:
            raise UserError(f"parallel.microbatches must be at least 1, got {par.microbatches}.")
        dims = cls(par.dp_replicate, dp_shard, par.tp, par.pp, par.cp, world_size, schedule,
                   par.virtual_stages, par.microbatches)
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

    @property
    def fsdp(self) -> int:
        """Ranks FSDP shards the weights over (cp ranks hold the same weights, so they shard too)."""
        return self.dp_shard * self.cp

    @property
    def stages_per_rank(self) -> int:
        if self.pp == 1:
            return 1
        if self.pp_schedule in V_SCHEDULES:
            return 2
        return 1 if self.pp_schedule in SINGLE_STAGE_SCHEDULES else self.virtual_stages

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def pipeline_microbatches(self, train_cfg) -> int:
        """Microbatches per step on one pipeline: parallel.microbatches, else local batch / micro_batch."""
        return self.microbatches or train_cfg.global_batch // (self.dp * train_cfg.micro_batch)

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
        if self.tp > 1:
            for name in ("ffn_hidden", "vocab_size"):
                if getattr(model_cfg, name) % self.tp:
                    raise UserError(f"Tensor parallel degree {self.tp} must divide model.{name} "
                                    f"({getattr(model_cfg, name)}).")
            if train_cfg.seq_len % (self.tp * self.cp * (2 if self.cp > 1 else 1)):
                raise UserError(
                    f"train.seq_len ({train_cfg.seq_len}) must be divisible by tp ({self.tp}) x 2 x cp ({self.cp}) "
                    f"for sequence parallelism." if self.cp > 1 else
                    f"train.seq_len ({train_cfg.seq_len}) must be divisible by tp ({self.tp}) for sequence parallelism."
                )
        if self.cp > 1 and train_cfg.seq_len % (2 * self.cp):
            raise UserError(f"train.seq_len ({train_cfg.seq_len}) must be divisible by 2 x cp ({self.cp}), "
                            f"the load-balanced chunks of context parallelism.")
        if self.pp > 1:
            self._validate_pipeline(model_cfg, train_cfg)

    def _validate_pipeline(self, model_cfg, train_cfg) -> None:
        if self.pp_schedule in SINGLE_STAGE_SCHEDULES and self.virtual_stages > 1:
            raise UserError(f"parallel.pp_schedule {self.pp_schedule!r} runs one stage per rank; use "
                            f"interleaved1f1b (or another multi-stage schedule) for virtual_stages={self.virtual_stages}.")
        if self.pp_schedule not in SINGLE_STAGE_SCHEDULES + V_SCHEDULES and self.virtual_stages < 2:
            raise UserError(f"parallel.pp_schedule {self.pp_schedule!r} needs parallel.virtual_stages of at least 2.")
        if model_cfg.layers % self.num_stages:
            raise UserError(f"model.layers ({model_cfg.layers}) must be divisible by the pipeline's "
                            f"{self.num_stages} stages (pp {self.pp} x {self.stages_per_rank} per rank).")
        if model_cfg.tie_embeddings:
            raise UserError("Pipeline parallelism needs untied embeddings (the first and last stages hold them "
                            "apart); set model.tie_embeddings=false or parallel.pp=1.")
        n = self.pipeline_microbatches(train_cfg)
        local = train_cfg.global_batch // self.dp
        if local % n:
            raise UserError(f"parallel.microbatches ({n}) must divide the per-pipeline batch of {local} sequences.")
        if self.stages_per_rank > 1 and n < self.pp:
            raise UserError(f"The {self.pp_schedule} schedule needs at least pp ({self.pp}) microbatches, got {n}; "
                            f"lower train.micro_batch or set parallel.microbatches.")

    def build_mesh(self, device_type: str):
        """One named DeviceMesh over the world (every dimension, size 1 included), with its flattened views."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        names = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
        mesh = init_device_mesh(device_type, tuple(getattr(self, n) for n in names), mesh_dim_names=names)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return mesh

    def dp_mesh(self, mesh):
        """The (flattened) data-parallel sub-mesh, or None when there is no data parallelism."""
        if mesh is None or self.dp == 1:
            return None
        return mesh["dp"]

    def fsdp_mesh(self, mesh):
        """What fully_shard runs on: (dp_replicate, dp_shard_cp) for HSDP, else dp_shard_cp."""
        if mesh is None or self.dp_replicate * self.fsdp == 1:
            return None
        if self.dp_replicate > 1:
            return mesh["dp_replicate", "dp_shard_cp"]
        return mesh["dp_shard_cp"]
