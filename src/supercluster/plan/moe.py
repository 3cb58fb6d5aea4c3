"""Mixture-of-Experts terms of the cost model: expert GEMMs, all-to-all dispatch and combine,
and where the experts' parameters live.

The shapes come from `model.config` (moe_experts, moe_top_k, moe_shared_experts, moe_hidden,
moe_dense_layers); expert parallelism is `Layout.ep`, carved out of the data-parallel ranks
("parallel folding", as torchtitan and Megatron-Core do it): each rank of an ep group holds
1/ep of every MoE layer's experts, and each expert's state is sharded over the data-parallel
ranks left over. What the planner assumes and the papers it follows:

* FLOPs follow the active parameters: a token passes through its top-k routed experts and
  the shared ones (Fedus et al. 2021, Switch Transformers; DeepSeek-AI 2024, DeepSeek-V3).
* Dispatch and combine are two all-to-alls forward and two backward per MoE layer, each
  moving a token's hidden vector once per chosen expert (Lepikhin et al. 2020, GShard);
  the share of them that stays on the rank is 1/ep. Inside one NVLink domain they run at
  the scale-up rate; an ep group spanning nodes sends its other nodes' share over each GPU's
  NIC (DeepSeek-V3 sec. 3.2.2 limits each token to 4 nodes for that reason).
* Load imbalance: the busiest rank of an ep group receives `imbalance` times the mean
  tokens; it sets the pace of the expert GEMMs and of the all-to-all. 1.0 is the perfectly
  balanced routing that published benchmarks force (Megatron-Bridge: "we force-balance the
  token distribution among experts"); real training runs above it (`--moe-imbalance`).
"""

from __future__ import annotations

import dataclasses

DEFAULT_IMBALANCE = 1.0


def is_moe(cfg) -> bool:
    return getattr(cfg, "moe_experts", 0) > 0


def counts(cfg) -> tuple[float, int]:
    """(mean parameters per block, MoE blocks), computed once per config object: the model's
    counts walk every layer, and a search asks for them thousands of times."""
    from supercluster.model.config import layer_params

    # every field (head_dim, shared experts, norms, biases... all change the counts), read shallowly
    key = tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg))
    cached = cfg.__dict__.get("_plan_counts")
    if cached is None or cached[0] != key:
        cached = (key, float(layer_params(cfg)), cfg.moe_layers if is_moe(cfg) else 0)
        cfg.__dict__["_plan_counts"] = cached  # not a dataclass field: asdict and == ignore it
    return cached[1], cached[2]


def mean_layer_params(cfg) -> float:
    return counts(cfg)[0]


def moe_layers(cfg) -> int:
    return counts(cfg)[1]


def expert_params_per_layer(cfg) -> float:
    """Routed experts' parameters of one MoE layer (SwiGLU: three matrices each)."""
    return cfg.moe_experts * 3 * cfg.hidden * cfg.moe_hidden if is_moe(cfg) else 0.0


def mean_expert_params(cfg) -> float:
    """Routed-expert parameters per layer averaged over all layers (dense ones hold none)."""
    return expert_params_per_layer(cfg) * moe_layers(cfg) / cfg.layers if is_moe(cfg) else 0.0


def ffn_width(cfg, imbalance: float = 1.0) -> float:
    """The feed-forward width one token's activations have in a MoE layer on the busiest rank:
    its k routed experts (times the imbalance) and the shared ones."""
    return (cfg.moe_top_k * imbalance + cfg.moe_shared_experts) * cfg.moe_hidden


def ffn_linear_time(cfg, lay, r, tokens: float, imbalance: float) -> float:
    """Forward seconds of one MoE layer's feed-forward on one rank for `tokens` tokens: the
    router (replicated, 16-bit), the local experts' grouped GEMMs over the tokens routed to
    them, and the shared experts (split over tp like a dense MLP).

    Each grouped GEMM is charged one kernel launch per local expert, not one per call:
    Transformer Engine's GroupedLinear (what Megatron-Core's TEGroupedMLP runs) issues its
    GEMMs through `nvte_multi_stream_cublas_gemm` (transformer_engine/common/gemm/
    cublaslt_gemm.cu), a host loop of one cuBLAS GEMM per expert spread over a few streams;
    the backward's data and weight gradients are two more such loops (the backward is charged
    twice the forward). With many small experts per rank at a small microbatch (Qwen3-30B-A3B:
    16 experts of 768 on a rank at ep 8, about 2,000 tokens each at microbatch 1) a GEMM
    computes for a few microseconds, the order of its launch (`cost.KERNEL_LAUNCH_S`).

    In FP8 the experts' inputs are quantized by the grouped GEMM's module itself, even in a
    stack that fuses casts elsewhere (`Software.fp8_cast_fused`): Transformer Engine's
    GroupedLinear (transformer_engine/pytorch/module/grouped_linear.py) runs
    `tex.split_quantize(inp_view, m_splits, input_quantizers)` on the permuted tokens (the
    up projection's input comes from the dispatcher's permutation, not from a norm whose
    kernel could write FP8) and on the activation's output (the down projection's input), and
    casts its weights to FP8 only on a step's first microbatch. So each expert input element
    pays the unfused cast (`cost.FP8_CAST_BYTES`), weights none. With FP8 dispatch
    (`Software.fp8_dispatch`, DeepSeek-V3 sec. 3.3.2) the tokens are quantized once on their
    own rank before the all-to-all and arrive in FP8: one cast per token, none per copy."""
    h, t, ep = cfg.hidden, lay.tp, getattr(lay, "ep", 1)
    local = cfg.moe_experts / ep
    # Each rank sends tokens*k (token, expert) pairs and receives as many on average.
    per_expert = tokens * cfg.moe_top_k * imbalance / local
    f = cfg.moe_hidden
    time = r.gemm(tokens, h, cfg.moe_experts)  # router scores
    # FP8: the grouped GEMMs quantize their own inputs in a casting-fusing stack (see the
    # docstring); a stack that casts in its own kernels everywhere already charges that.
    own = r.own_cast_bytes if r.cast_fused else None
    up_cast = own
    if own is not None and r.fp8_dispatch:  # quantized once per token before the dispatch
        up_cast = 0.0
        time += r.memory_pass(own * tokens * h) if r.fp8 else 0.0
    # A grouped GEMM: one cuBLAS launch per local expert (see the docstring).
    time += r.gemm(per_expert, h, 2 * f / t, batch=local, linear=True, launches=local, own_cast=up_cast)  # gate and up
    time += r.gemm(per_expert, f / t, h, batch=local, linear=True, launches=local, own_cast=own)  # down, grouped
    if cfg.moe_shared_experts:
        width = cfg.moe_shared_experts * f
        time += r.gemm(tokens, h, 2 * width / t, linear=True) + r.gemm(tokens, width / t, h, linear=True)
    return time


def distinct_nodes(cfg, nodes: int) -> float:
    """Expected nodes one token's top-k experts land on, of the `nodes` an ep group spans:
    k uniform picks among n nodes hit n(1 - (1 - 1/n)^k) of them; group-limited routing caps
    it where the groups are the nodes (DeepSeek-V3 sec. 2.1.2: at most M = 4 nodes a token)."""
    hit = nodes * (1 - (1 - 1 / nodes) ** cfg.moe_top_k)
    groups = getattr(cfg, "moe_groups", 1)
    if groups > 1 and groups % nodes == 0:  # each node holds whole groups
        hit = min(hit, getattr(cfg, "moe_topk_groups", groups) * nodes / groups)
    return min(hit, cfg.moe_top_k)


def all_to_all_time(cfg, lay, r, tokens: float, imbalance: float, sw=None) -> tuple[float, str]:
    """Seconds of one dispatch or combine all-to-all (the mean of the two) of one MoE layer
    for one microbatch on the busiest rank, and the tier it crosses. The ep group's ranks sit
    tp*cp apart. `sw.ep_node_dedup`: across nodes a token is sent once per node it needs and
    fanned out over NVLink there (DeepSeek-V3 sec. 3.2.2); `sw.fp8_dispatch`: the dispatch
    moves FP8 elements and a scale per 128, the combine 16-bit ones (sec. 3.3.2)."""
    ep = getattr(lay, "ep", 1)
    if ep <= 1:
        return 0.0, "none"
    # With sequence parallelism each tp rank dispatches its own s/tp tokens.
    sp = lay.tp if lay.sequence_parallel and lay.tp > 1 else 1
    elem = (1 + 4 / 128 + r.elem) / 2 if getattr(sw, "fp8_dispatch", False) else r.elem
    per_copy = elem * tokens / sp * imbalance * cfg.hidden  # one copy of the rank's tokens
    nbytes = per_copy * cfg.moe_top_k * (ep - 1) / ep
    # Ranks of an ep group sit tp*cp apart, unless ep folds over the tp and cp ranks as well.
    span = lay.tp * lay.cp * ep if lay.dp_shard % ep == 0 else ep
    if span <= r.gpus_per_node:
        return nbytes / r.up + r.latency, "scale-up"
    in_node = max(1, r.gpus_per_node * ep // span)  # ep ranks sharing a node
    outside = nbytes * (ep - in_node) / (ep - 1)
    inside = nbytes - outside
    tier = "scale-up + scale-out"
    if getattr(sw, "ep_node_dedup", False):
        nodes = max(1, ep // in_node)
        outside = per_copy * distinct_nodes(cfg, nodes) * (nodes - 1) / nodes  # one copy per remote node
        inside = nbytes  # every copy still reaches its expert's GPU over NVLink
        tier += ", node-deduplicated"
    # NVLink and the NICs carry their shares at once; the slower sets the time.
    return max(inside / r.up, outside / r.out) + r.latency, tier
