"""The search: every layout the fixed knobs allow, checked for memory, ranked by step time.

What the user fixes is kept, what is not is searched; with every knob fixed exactly one
layout is evaluated. Only layouts the training stack runs are searched: its sharding
strategies (`Software.shardings`), and for this repository's trainer whatever
`Layout.validate` accepts. Pipelines whose stages cannot hold equal layer counts get the
balanced uneven split. Recomputation and sharding are not free choices: for each layout the
search takes, per recompute mode, the least sharding that fits (more only adds
communication), so memory decides them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from supercluster.errors import UserError, closest
from supercluster.model.config import ModelConfig
from supercluster.parallel.layout import PP_SCHEDULES, RECOMPUTE, SHARDING, Layout, schedule_name
from supercluster.plan.cost import (
    MEMORY_MARGIN, RESERVED_GIB, Estimate, System, Workload, add_interval, estimate, load_constants, load_intervals, memory,
)
from supercluster.plan.profiles import Software, profile

KNOBS = ("tp", "pp", "dp", "cp", "ep", "microbatch", "virtual_stages", "sharding", "recompute", "sequence_parallel",
         "pp_schedule", "stage_layers")
MICROBATCHES = (1, 2, 4, 8, 16)
VIRTUAL_STAGES = (1, 2, 3, 4, 6, 8)
LONG_SEQUENCE = 8192  # context parallelism is only searched from here; below, it just adds traffic


@dataclass
class Request:
    work: Workload
    system: System
    gpus: int
    software: Software = field(default_factory=profile)
    fixed: dict = field(default_factory=dict)  # knob -> value, from KNOBS


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]  # pairs (d, n // d): sqrt(n) steps, not n
    return sorted({*small, *(n // d for d in small)})


def spare_stages(sw: Software) -> int:
    """Pipeline stages beyond one per layer the stack allows (embedding-only and loss-only)."""
    return 2 if sw.embedding_stages else 0


def _check_fixed(req: Request) -> None:
    """Reject fixed knobs that no layout can satisfy, with the fix in one sentence."""
    f, cfg, node = req.fixed, req.work.model, req.system.node
    unknown = set(f) - set(KNOBS)
    if unknown:
        raise UserError(f"Unknown layout knob {sorted(unknown)[0]!r}; the knobs are {', '.join(KNOBS)}.")
    for knob in ("tp", "pp", "dp", "cp", "ep", "microbatch", "virtual_stages"):
        if knob in f and f[knob] < 1:
            raise UserError(f"--{knob.replace('_', '-')} must be at least 1, got {f[knob]}.")
    if "tp" in f:
        tp = f["tp"]
        if cfg.heads % tp or cfg.kv_heads % tp:
            raise UserError(
                f"--tp {tp} does not divide the model's {cfg.heads} attention heads and {cfg.kv_heads} key/value heads; "
                f"choose a divisor of {cfg.kv_heads}."
            )
        if tp > node.gpus_per_node:
            raise UserError(
                f"--tp {tp} exceeds the {node.gpus_per_node} GPUs of one {node.name} node; tensor parallelism needs the "
                f"scale-up link, so use --tp {node.gpus_per_node} or less."
            )
    degrees = [f[k] for k in ("tp", "pp", "dp", "cp") if k in f]
    product = math.prod(degrees)
    if len(degrees) == 4 and product != req.gpus:
        raise UserError(
            f"tp*pp*dp*cp = {f['tp']}*{f['pp']}*{f['dp']}*{f['cp']} = {product}, not the {req.gpus} GPUs asked for; "
            f"choose degrees whose product is {req.gpus}."
        )
    if req.gpus % product:
        raise UserError(f"The fixed degrees multiply to {product}, which does not divide {req.gpus} GPUs; choose divisors of {req.gpus}.")
    if "pp" in f and cfg.layers + spare_stages(req.software) < f["pp"] * f.get("virtual_stages", 1):
        raise UserError(
            f"--pp {f['pp']} x --virtual-stages {f.get('virtual_stages', 1)} stages is more than the model's "
            f"{cfg.layers} layers; every stage needs one."
        )
    if f.get("virtual_stages", 1) > 1 and f.get("pp", 2) == 1:
        raise UserError("--virtual-stages above 1 needs pipeline parallelism; add --pp 2 or more.")
    if "sharding" in f:
        if f["sharding"] not in SHARDING:
            raise UserError(f"--sharding must be one of {', '.join(SHARDING)}, got {f['sharding']!r}"
                            f"{closest(f['sharding'], SHARDING)}.")
        if f["sharding"] not in req.software.shardings:
            raise UserError(f"--sharding {f['sharding']} is not run by the {req.software.name} stack; "
                            f"use one of {', '.join(req.software.shardings)}.")
    if "pp_schedule" in f and schedule_name(f["pp_schedule"]) not in PP_SCHEDULES:
        raise UserError(f"--pp-schedule must be one of {', '.join(PP_SCHEDULES)}, got {f['pp_schedule']!r}"
                        f"{closest(schedule_name(f['pp_schedule']), PP_SCHEDULES)}.")
    if "stage_layers" in f:
        stages = tuple(f["stage_layers"])
        if sum(stages) != cfg.layers or min(stages) < 1:
            raise UserError(f"--stage-layers {','.join(map(str, stages))} sums to {sum(stages)} layers but the model has "
                            f"{cfg.layers}; give every stage at least one layer and make them add up.")
    if "ep" in f and f["ep"] > 1:
        experts = getattr(cfg, "moe_experts", 0)
        if not experts:
            raise UserError(f"--ep {f['ep']} puts experts on ranks but the model is dense (no experts); drop --ep.")
        if experts % f["ep"]:
            raise UserError(f"--ep {f['ep']} does not divide the model's {experts} experts; choose a divisor of {experts}.")
        if "dp" in f and f["dp"] % f["ep"] and not req.software.expert_tp_cp:
            raise UserError(f"--ep {f['ep']} must divide --dp {f['dp']}: expert parallelism is carved out of the "
                            f"data-parallel ranks.")
    if "recompute" in f and f["recompute"] not in RECOMPUTE:
        raise UserError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {f['recompute']!r}.")
    if "cp" in f and req.work.seq_len % (2 * f["cp"]) and f["cp"] > 1:
        raise UserError(f"--seq-len {req.work.seq_len} must be divisible by 2*cp = {2 * f['cp']}; change --cp or --seq-len.")
    if "dp" in f:
        per_replica = f["dp"] * f.get("microbatch", 1)
        if req.work.global_batch % per_replica:
            raise UserError(
                f"--global-batch {req.work.global_batch} is not divisible by dp*microbatch = {per_replica}; "
                f"use a multiple of {per_replica}."
            )


def _choices(req: Request, knob: str, default: list) -> list:
    return [req.fixed[knob]] if knob in req.fixed else default


def layouts(req: Request):
    """Every layout that divides the machine and the model evenly (memory not yet checked)."""
    cfg, s, batch, gpn = req.work.model, req.work.seq_len, req.work.global_batch, req.system.node.gpus_per_node
    # Megatron-style TP splits heads, K/V heads and the MLP; sequence parallelism splits tokens.
    tps = [
        t for t in _divisors(min(req.gpus, gpn))
        if req.gpus % t == 0 and cfg.heads % t == 0 and cfg.kv_heads % t == 0 and cfg.ffn_hidden % t == 0 and s % t == 0
    ]
    cps = [c for c in (1, 2, 4, 8, 16) if s >= LONG_SEQUENCE and s % (2 * c) == 0] or [1]
    experts = getattr(cfg, "moe_experts", 0)
    for tp in _choices(req, "tp", tps):
        for cp in _choices(req, "cp", cps):
            if req.gpus % (tp * cp):
                continue
            rest = req.gpus // (tp * cp)
            # Stages hold whole layers, uneven where they must (the balanced split).
            for pp in _choices(req, "pp", [p for p in _divisors(rest) if p <= cfg.layers]):
                if rest % pp:
                    continue
                dp = rest // pp
                if "dp" in req.fixed and req.fixed["dp"] != dp:
                    continue
                if batch % dp:
                    continue
                for mb in _choices(req, "microbatch", [b for b in MICROBATCHES if (batch // dp) % b == 0]):
                    if (batch // dp) % mb:
                        continue
                    m = batch // (dp * mb)
                    # Interleaving needs a stage per chunk and a multiple of pp microbatches (Narayanan sec. 2.2.2).
                    spare = spare_stages(req.software)
                    vs = [1] if pp == 1 else [v for v in VIRTUAL_STAGES
                                              if v == 1 or (cfg.layers + spare >= pp * v and m % pp == 0)]
                    for v in _choices(req, "virtual_stages", vs):
                        sp = req.fixed.get("sequence_parallel", tp > 1)
                        default = "interleaved1f1b" if v > 1 else "1f1b"
                        schedule = schedule_name(req.fixed.get("pp_schedule", default))
                        stages = req.fixed.get("stage_layers")
                        lay = Layout(tp=tp, pp=pp, dp_replicate=1, dp_shard=dp, cp=cp, microbatch=mb, virtual_stages=v,
                                     sharding="full", recompute="none", sequence_parallel=sp, pp_schedule=schedule,
                                     stage_layers=tuple(stages) if stages is not None else None)
                        if not experts:
                            yield lay
                            continue
                        # Expert parallelism folds into the data-parallel ranks: ep divides
                        # both dp and the experts.
                        # Stacks that fold ep over tp and cp ranks too (Megatron-Core) take any
                        # divisor of dp*tp*cp.
                        pool = dp * (tp * cp if req.software.expert_tp_cp else 1)
                        for ep in _choices(req, "ep", [e for e in _divisors(pool) if experts % e == 0]):
                            if pool % ep == 0 and experts % ep == 0:
                                yield replace(lay, ep=ep)


def runnable_model(model: ModelConfig, lay: Layout) -> ModelConfig:
    """The model as the trainer builds it for this layout: the vocabulary padded to a multiple
    of 128*tp when tp does not divide it (Megatron-LM's padding: GPT-2's 50257 becomes 51200
    at tp 8), and untied embeddings under pipelining (first and last stages each hold one)."""
    changes = {}
    if lay.tp > 1 and model.vocab_size % lay.tp:
        changes["vocab_size"] = -(-model.vocab_size // (128 * lay.tp)) * 128 * lay.tp
    if lay.pp > 1 and model.tie_embeddings:
        changes["tie_embeddings"] = False
    return replace(model, **changes) if changes else model


def with_sharding(lay: Layout, sharding: str) -> Layout:
    """Unsharded data parallelism is replication: its ranks move to dp_replicate."""
    if sharding == "none":
        return replace(lay, sharding=sharding, dp_replicate=lay.dp, dp_shard=1)
    return replace(lay, sharding=sharding, dp_replicate=1, dp_shard=lay.dp)


def _with_memory_choices(req: Request, base: Layout, reserved_gib: float, allowed: list):
    """Per recompute mode, the least sharding that fits; yields (layout, memory) pairs,
    feasible or not, so that the caller can report the nearest miss."""
    shards = base.dp * base.cp
    stages = [s for s in SHARDING if s in allowed]  # least sharded first
    if "optimizer" in stages and "none" in stages:
        stages.remove("none")  # a sharded optimizer moves the same bytes as an all-reduce and holds less
    unsharded = "none" if "none" in allowed else stages[0]
    choices = _choices(req, "sharding", [unsharded] if shards == 1 else stages)
    m = req.work.global_batch // (base.dp * base.microbatch)
    capacity = req.system.accelerator.hbm_gib
    for recompute in _choices(req, "recompute", list(RECOMPUTE)):
        nearest = None
        for sharding in choices:
            lay = replace(with_sharding(base, sharding), recompute=recompute)
            mem = memory(req.work.model, lay, req.software, req.work.seq_len, m, reserved_gib, req.system.precision)
            if mem["total"] <= capacity:
                yield lay, mem, True
                break
            if nearest is None or mem["total"] < nearest[1]["total"]:
                nearest = (lay, mem)
        else:
            # Over HBM within the memory model's own error: answered, with a warning.
            yield nearest[0], nearest[1], "warn" if nearest[1]["total"] <= capacity * (1 + MEMORY_MARGIN) else False


def search(req: Request, top: int = 10, constants: dict | None = None) -> list[Estimate]:
    """The `top` fastest feasible layouts, best first; UserError when none fits."""
    _check_fixed(req)
    constants = constants or load_constants(req.software.name)
    reserved = 0.0 if req.system.accelerator.vendor == "cpu" else RESERVED_GIB
    plans, nearest, seen, refused = [], None, 0, None
    gpn = req.system.node.gpus_per_node
    for base in layouts(req):
        seen += 1
        # Only what the trainer runs: the same rules `supercluster train` applies (the
        # sharding choices below are the stack's own).
        model = runnable_model(req.work.model, base)
        allowed = []
        for sharding in ([req.fixed["sharding"]] if "sharding" in req.fixed else req.software.shardings):
            found = with_sharding(base, sharding).problems(model, req.work.seq_len, req.work.global_batch, gpn,
                                                           req.software.shardings, spare_stages(req.software),
                                                           req.software.expert_tp_cp)
            if found:
                refused = refused or found[0]
            else:
                allowed.append(sharding)
        if not allowed:
            continue
        for lay, mem, fits in _with_memory_choices(req, base, reserved, allowed):
            if fits:
                est = estimate(req.work, lay, req.system, req.software, constants)
                if fits == "warn":
                    cap = req.system.accelerator.hbm_gib
                    est.warnings.append(
                        f"predicted {mem['total']:.1f} GiB per GPU is {mem['total'] - cap:.1f} GiB over the {cap:.0f} GiB of "
                        f"HBM, within the memory model's {MEMORY_MARGIN:.0%} error: it may not fit")
                plans.append(est)
            elif nearest is None or mem["total"] < nearest[1]["total"]:
                nearest = (lay, mem)
    if not seen:
        raise UserError(
            f"No layout of {req.gpus} GPUs divides this model and a global batch of {req.work.global_batch} sequences; "
            f"make --global-batch a multiple of the data-parallel size or free a fixed degree."
        )
    if not plans and nearest is None:
        raise UserError(refused)
    if not plans:
        lay, mem = nearest
        cap = req.system.accelerator.hbm_gib
        raise UserError(
            f"The model fits no layout: the nearest (tp={lay.tp}, pp={lay.pp}, dp={lay.dp}, cp={lay.cp}, "
            f"microbatch={lay.microbatch}, sharding={lay.sharding}, recompute={lay.recompute}) needs {mem['total']:.1f} GiB per GPU, "
            f"{mem['total'] - cap:.1f} GiB more than the {cap:.0f} GiB of one {req.system.accelerator.name}; "
            f"use more GPUs, a larger --pp or --tp, --recompute full, --sharding full or a smaller --microbatch."
        )
    plans.sort(key=lambda e: (bool(e.warnings), e.step_time_s, e.memory_gib_per_gpu))  # sure fits first
    intervals = load_intervals()
    moe_model = getattr(req.work.model, "moe_experts", 0) > 0
    return [add_interval(est, req.system.precision, intervals, moe_model) for est in plans[:top]]
