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
With "none" every data-parallel rank is a replica, so dp_shard stays 1.

Recompute policies, one meaning each, in the trainer and the cost model alike:
- "none":      keep every activation
- "selective": keep matmul and attention outputs, recompute the cheap elementwise ops
- "full":      keep only each block's input, recompute the block in backward

Expert parallelism (`ep`) folds into the data-parallel ranks, as torchtitan and Megatron-Core
do: it splits dp_shard into ep groups of neighbouring ranks that each hold 1/ep of every MoE
layer's experts, and the experts are FSDP-sharded over the dp_shard/ep ranks left over. So ep
adds no ranks of its own (`gpus` leaves it out) and needs a model with experts.

Pipeline stages hold whole layers, uneven counts allowed (`stage_layers`); left unset, the
split balances modelled cost with the embedding on the first stage and the final norm,
output layer and loss on the last (Llama 3 405B: 126 layers on 16 stages as 7, 8 x 14, 7).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from supercluster.errors import UserError, closest

SHARDING = ("none", "optimizer", "keep_gathered", "full")
TRAINER_SHARDING = ("none", "keep_gathered", "full")  # what this repository's trainer runs (FSDP2 or replicas)
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
# Schedules that split backward into input and weight gradients. With FSDP2 resharding after
# forward they train to different losses than one process (torch 2.13, seen on CPU ranks), so
# they run with weights kept gathered.
ZERO_BUBBLE_SCHEDULES = ("interleavedzerobubble", "zbvzerobubble", "dualpipev")


def schedule_name(name: str) -> str:
    """The canonical spelling of a pipeline schedule: "Interleaved-1F1B" -> "interleaved1f1b"."""
    return name.lower().replace("_", "").replace("-", "")


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
    stage_layers: tuple[int, ...] | None = None  # layers per pipeline stage (uneven allowed); None: balanced split
    microbatch: int = 1  # sequences per forward/backward on one rank
    recompute: str = "none"
    sequence_parallel: bool = True  # with tp > 1: norms and residuals sharded along the sequence
    ep: int = 1  # expert parallel degree, carved out of dp_shard (see the module's docstring)

    @property
    def dp(self) -> int:
        """Ranks that see different data: both data-parallel dimensions."""
        return self.dp_replicate * self.dp_shard

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def expert_shard(self) -> int:
        """Ranks that FSDP shards each expert over: what is left of dp_shard after ep."""
        return self.dp_shard // self.ep if self.ep >= 1 else self.dp_shard

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

    def microbatches(self, global_batch: int) -> int:
        """Microbatches each pipeline (or each rank's accumulation loop) runs per step."""
        return global_batch // (self.dp * self.microbatch)

    def stage_ids(self, pp_rank: int) -> list[int]:
        """The pipeline stages rank `pp_rank` holds: one, several in a loop (r, r+pp, ...) or two in a V."""
        if self.pp_schedule in V_SCHEDULES and self.pp > 1:
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        return [pp_rank + i * self.pp for i in range(self.stages_per_rank)]

    def split(self, model) -> tuple[int, ...]:
        """Layers per stage: the explicit `stage_layers`, else the balanced split."""
        if self.stage_layers is not None:
            return tuple(self.stage_layers)
        return balanced_split(model, self.num_stages)

    def layer_ranges(self, model) -> list[range]:
        """The layer indices of each stage, in stage order."""
        out, start = [], 0
        for n in self.split(model):
            out.append(range(start, start + n))
            start += n
        return out

    def parallel_keys(self, model) -> dict:
        """The [parallel] section of a train config that runs this layout (train.micro_batch and
        train.recompute complete it); pipelines name their stage split explicitly."""
        out = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp, "pp": self.pp,
               "cp": self.cp, "sharding": self.sharding, "sequence_parallel": self.sequence_parallel,
               "pp_schedule": self.pp_schedule, "virtual_stages": self.virtual_stages, "ep": self.ep}
        if self.pp > 1:
            out["stage_layers"] = list(self.split(model))
        return out

    def describe(self) -> str:
        """One line naming every choice, the same from the planner and the trainer."""
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp_replicate}x{self.dp_shard}", f"cp{self.cp}",
                 f"mb{self.microbatch}", self.sharding, f"recompute {self.recompute}"]
        if self.ep > 1:
            parts.insert(4, f"ep{self.ep}")
        if self.tp > 1:
            parts.append("sp" if self.sequence_parallel else "no-sp")
        if self.pp > 1:
            parts.append(f"{self.pp_schedule} v{self.virtual_stages}")
            if self.stage_layers is not None:
                parts.append("stages " + "/".join(map(str, self.stage_layers)))
        return " ".join(parts)

    def validate(self, model, seq_len: int, global_batch: int, gpus_per_node: int | None = None,
                 shardings: tuple = TRAINER_SHARDING) -> "Layout":
        """Raise UserError with the first broken rule; return self when the layout runs."""
        found = self.problems(model, seq_len, global_batch, gpus_per_node, shardings)
        if found:
            raise UserError(found[0])
        return self

    def problems(self, model, seq_len: int, global_batch: int, gpus_per_node: int | None = None,
                 shardings: tuple = TRAINER_SHARDING, spare_stages: int = 0, expert_tp_cp: bool = False) -> list[str]:
        """Every rule this layout breaks for `model` at this sequence length and batch, one sentence each.

        `shardings` are the strategies the training stack runs (this trainer's by default)."""
        out = []
        for name in ("tp", "pp", "dp_replicate", "dp_shard", "cp", "ep", "virtual_stages", "microbatch"):
            if getattr(self, name) < 1:
                out.append(f"parallel.{name} must be at least 1, got {getattr(self, name)}.")
        if out:
            return out
        if self.sharding not in SHARDING:
            out.append(f"Sharding {self.sharding!r} is not one of {', '.join(SHARDING)}{closest(self.sharding, SHARDING)}.")
        elif self.sharding not in shardings:
            out.append(f"Sharding {self.sharding!r} is not something this training stack runs; "
                       f"use one of {', '.join(shardings)}.")
        if self.recompute not in RECOMPUTE:
            out.append(f"Recompute {self.recompute!r} is not one of {', '.join(RECOMPUTE)}{closest(self.recompute, RECOMPUTE)}.")
        if self.pp_schedule not in PP_SCHEDULES:
            out.append(f"Pipeline schedule {self.pp_schedule!r} is not one of {', '.join(PP_SCHEDULES)}"
                       f"{closest(self.pp_schedule, PP_SCHEDULES)}.")
        if self.sharding == "none" and self.dp_shard > 1:
            out.append(f"Sharding 'none' keeps a full replica on every data-parallel rank, so dp_shard must be 1 "
                       f"(got {self.dp_shard}); put the {self.dp_shard} ranks in dp_replicate or pick a sharding.")
        if gpus_per_node is not None and self.tp > gpus_per_node:
            out.append(f"Tensor parallel degree {self.tp} exceeds the {gpus_per_node} GPUs of one node; "
                       f"tensor parallelism needs the scale-up link, so use tp {gpus_per_node} or less.")
        if model.heads % self.tp or model.kv_heads % self.tp:
            out.append(f"Tensor parallel degree {self.tp} must divide the heads ({model.heads}) and kv-heads ({model.kv_heads}).")
        if self.tp > 1:
            for name in ("ffn_hidden", "vocab_size"):
                if getattr(model, name) % self.tp:
                    out.append(f"Tensor parallel degree {self.tp} must divide model.{name} ({getattr(model, name)}).")
        chunk = (self.tp if self.tp > 1 and self.sequence_parallel else 1) * (2 * self.cp if self.cp > 1 else 1)
        if seq_len % chunk:
            out.append(f"The sequence length {seq_len} must be divisible by {chunk}: "
                       + ("tp for sequence parallelism" if self.tp > 1 and self.sequence_parallel else "")
                       + (" x " if self.tp > 1 and self.sequence_parallel and self.cp > 1 else "")
                       + ("2 x cp, the load-balanced chunks of context parallelism" if self.cp > 1 else "") + ".")
        out += self._expert_problems(model, expert_tp_cp)
        if global_batch % (self.dp * self.microbatch):
            out.append(f"The global batch ({global_batch}) must be divisible by the data-parallel degree ({self.dp}) "
                       f"x the microbatch ({self.microbatch}).")
        if self.pp == 1:
            if self.virtual_stages > 1:
                out.append(f"virtual_stages={self.virtual_stages} needs pipeline parallelism; set pp to 2 or more.")
            if self.stage_layers is not None and tuple(self.stage_layers) != (model.layers,):
                out.append("parallel.stage_layers needs pipeline parallelism (pp of 2 or more).")
            return out
        if self.pp_schedule in PP_SCHEDULES:
            out += self._pipeline_problems(model, global_batch, spare_stages)
        return out

    def _expert_problems(self, model, expert_tp_cp: bool = False) -> list[str]:
        if self.ep == 1:
            return []
        experts = getattr(model, "moe_experts", 0)
        if not experts:
            return [f"parallel.ep = {self.ep} puts experts on ranks but the model is dense (no experts); set ep to 1."]
        out = []
        if experts % self.ep:
            out.append(f"Expert parallel degree {self.ep} must divide the model's {experts} experts.")
        if (self.dp_shard * (self.tp * self.cp if expert_tp_cp else 1)) % self.ep:
            out.append(f"Expert parallel degree {self.ep} must divide dp_shard ({self.dp_shard}): expert parallelism "
                       f"is carved out of the data-parallel ranks.")
        if self.tp > 1 and not expert_tp_cp:
            out.append("Expert parallelism with tensor parallelism is not built; use tp 1 or ep 1.")
        if self.cp > 1 and not expert_tp_cp:
            out.append("Expert parallelism with context parallelism is not built; use cp 1 or ep 1.")
        return out

    def _pipeline_problems(self, model, global_batch: int, spare_stages: int = 0) -> list[str]:
        out = []
        if self.pp_schedule in SINGLE_STAGE_SCHEDULES and self.virtual_stages > 1:
            out.append(f"Pipeline schedule {self.pp_schedule!r} runs one stage per rank; use interleaved1f1b "
                       f"(or another multi-stage schedule) for virtual_stages={self.virtual_stages}.")
        if self.pp_schedule not in SINGLE_STAGE_SCHEDULES + V_SCHEDULES and self.virtual_stages < 2:
            out.append(f"Pipeline schedule {self.pp_schedule!r} needs virtual_stages of at least 2.")
        if self.pp_schedule in V_SCHEDULES and self.virtual_stages not in (1, 2):
            out.append(f"Pipeline schedule {self.pp_schedule!r} runs exactly 2 stages per rank; set virtual_stages to 2.")
        if self.stage_layers is not None:
            got = tuple(self.stage_layers)
            if len(got) != self.num_stages:
                out.append(f"parallel.stage_layers lists {len(got)} stages but the pipeline has {self.num_stages} "
                           f"(pp {self.pp} x {self.stages_per_rank} per rank); give one layer count per stage.")
            elif any(n < 1 for n in got):
                out.append("Every pipeline stage needs at least one layer; parallel.stage_layers has a stage with none.")
            elif sum(got) != model.layers:
                out.append(f"parallel.stage_layers {list(got)} sums to {sum(got)} layers but the model has "
                           f"{model.layers}; make the stage counts add up to the layers.")
        elif model.layers + spare_stages < self.num_stages:  # spare: stages holding only the embedding or the loss
            out.append(f"The model's {model.layers} layers cannot fill {self.num_stages} pipeline stages "
                       f"(pp {self.pp} x {self.stages_per_rank} per rank); lower pp or virtual_stages.")
        if model.tie_embeddings:
            out.append("Pipeline parallelism needs untied embeddings (the first and last stages hold them apart); "
                       "set model.tie_embeddings=false or pp to 1.")
        if self.pp_schedule in ZERO_BUBBLE_SCHEDULES and self.sharding == "full" and self.dp * self.cp > 1:
            out.append(f"Pipeline schedule {self.pp_schedule!r} splits weight gradients from the backward pass, which "
                       f"FSDP2's full sharding does not run correctly; use sharding keep_gathered (or none).")
        n = self.microbatches(global_batch)
        if self.pp_schedule == "dualpipev" and 0 < n < self.num_stages:
            out.append(f"The dualpipev schedule needs at least as many microbatches per step as stages "
                       f"({self.num_stages}), got {n}; lower the microbatch size or raise the global batch.")
        elif self.stages_per_rank > 1 and 0 < n < self.pp:
            out.append(f"The {self.pp_schedule} schedule needs at least pp ({self.pp}) microbatches per step, got {n}; "
                       f"lower the microbatch size or raise the global batch.")
        return out


# ---- the balanced stage split -------------------------------------------------------------------


def stage_costs(model) -> tuple[float, float, float]:
    """(one layer, first-stage extra, last-stage extra) in training FLOPs per token.

    The embedding is a lookup (almost free in FLOPs but never zero: it breaks ties toward a
    lighter first stage, as Llama 3 did); the last stage runs the output layer and the loss."""
    from supercluster.model.config import layer_params

    h, v = model.hidden, model.vocab_size
    layer = 6 * layer_params(model, active=True)  # a MoE layer's FLOPs follow its active experts
    first = 6 * h  # gather and scatter-add of one embedding row
    last = 6 * h * v + 10 * v  # output GEMM forward and backward, softmax cross-entropy passes
    return float(layer), float(first), float(last)


def balanced_split(model, stages: int) -> tuple[int, ...]:
    """Layers per stage that minimise the busiest stage's modelled cost (contiguous, at least one each)."""
    layers = model.layers
    if stages <= 1:
        return (layers,)
    if layers < stages:
        raise UserError(f"The model's {layers} layers cannot fill {stages} pipeline stages; lower pp or virtual_stages.")
    return _split(layers, stages, *stage_costs(model))


@functools.lru_cache(maxsize=4096)  # the planner asks for the same few splits thousands of times
def _split(layers: int, stages: int, layer: float, first: float, last: float) -> tuple[int, ...]:
    extra = [first if s == 0 else 0.0 for s in range(stages)]
    extra[-1] += last

    def fill(target: float) -> list[int]:
        return [max(1, math.floor((target - e) / layer + 1e-9)) for e in extra]

    # The smallest busiest-stage cost whose greedy fill holds every layer: a candidate is
    # some stage's cost with n layers, so search those values.
    candidates = sorted({n * layer + e for e in set(extra) for n in range(1, layers + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(fill(candidates[mid])) >= layers:
            hi = mid
        else:
            lo = mid + 1
    counts = fill(candidates[lo])
    # Too many layers by now: take them off the costliest stages (ties: the earliest).
    while sum(counts) > layers:
        costs = [(n * layer + e if n > 1 else -1.0) for n, e in zip(counts, extra)]
        counts[costs.index(max(costs))] -= 1
    return tuple(counts)
