"""The one parallel layout: what the planner searches and costs, and what the trainer runs.

Torch-free, so that `plan` can import it without starting torch. A layout is the parallel
degrees, how data-parallel ranks shard the model state, the pipeline schedule with its stage
boundaries, the microbatch, the recompute policy and sequence parallelism.

Sharding strategies (what each data-parallel rank keeps of the model state):
- "none":          replicated weights; gradients all-reduced (DDP)
- "optimizer":     optimizer state sharded (ZeRO-1: Megatron's distributed optimizer, DeepSpeed
                   stage 1); other stacks only, this trainer does not run it
- "keep_gathered": FSDP2 with reshard_after_forward=False: weights gathered once per step and
                   kept from forward to backward (ZeRO-2's memory, fewer all-gathers)
- "full":          FSDP2 with reshard_after_forward=True: weights, gradients and optimizer state
                   sharded, gathered again for backward (ZeRO-3)
HSDP is dp_replicate > 1 with a sharding strategy: shard within dp_shard, replicate across.

Recompute policies, one meaning each, in the trainer and the cost model alike:
- "none":      keep every activation
- "selective": keep matmul and attention outputs, recompute the cheap elementwise ops
- "full":      keep only each block's input, recompute the block in backward
"""

from __future__ import annotations

from dataclasses import dataclass

SHARDING = ("none", "optimizer", "keep_gathered", "full")
RECOMPUTE = ("none", "selective", "full")
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


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    sharding: str = "full"
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedules)
    stage_layers: tuple[int, ...] | None = None  # layers per pipeline stage (uneven allowed); None: even split
    microbatch: int = 1  # sequences per forward/backward on one rank
    recompute: str = "none"
    sequence_parallel: bool = True  # with tp > 1: norms and residuals sharded along the sequence

    @property
    def dp(self) -> int:
        """Ranks that see different data: both data-parallel dimensions."""
        return self.dp_replicate * self.dp_shard

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

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
