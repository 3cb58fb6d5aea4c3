"""The cost model: one training step of one parallel layout, in seconds and bytes.

Every term is written next to the paper it comes from:

* Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
  Using Megatron-LM" (arXiv:2104.04473): tensor/pipeline/data parallel costs, the pipeline
  batch time (b'/b + p - 1)(t_f + t_b) and the interleaved bubble (p-1)/(v*m), FLOPs eq. (3).
* Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv:2205.05198): activation bytes per layer with and without sequence parallelism and
  selective/full recomputation, model vs hardware FLOPs (MFU/HFU).
* Rajbhandari et al. 2020, "ZeRO" (arXiv:1910.02054): bytes per parameter of mixed-precision
  Adam (2 + 2 + 12, here 2 + 4 + 12 with fp32 gradients) and what each stage shards.
* Chan et al. 2007 / NCCL's performance notes: ring collectives move (n-1)/n of the buffer per
  step, an all-reduce twice that ("bus bandwidth").

Only the constants in `constants.json` are fitted (by `plan.calibrate`, once, against
published runs); everything else is a count of FLOPs and bytes divided by a datasheet rate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from supercluster.hardware.catalog import Accelerator, NodeType
from supercluster.model.config import ModelConfig, flops_per_token, layer_params, matmul_params
from supercluster.parallel.layout import RECOMPUTE, TRAINER_SHARDING, Layout  # noqa: F401 (re-exported)
CONSTANTS_FILE = Path(__file__).with_name("constants.json")

# Physical constants, not fitted (each is a property of the hardware or software stack):
LINK_EFFICIENCY = 0.8  # NCCL ring bus bandwidth / line rate where no pass mark is published (A100: 228 of 300 GB/s)
MEMORY_EFFICIENCY = 0.8  # STREAM-like kernels reach ~80% of HBM peak
KERNEL_LAUNCH_S = 5e-6  # per GEMM / collective launch on a GPU
COLLECTIVE_LATENCY_S = 20e-6  # per ring collective or p2p message across IB (NCCL base latency, order of 10-30 us)
RESERVED_GIB = 2.0  # CUDA/ROCm context, NCCL buffers and allocator slack per GPU
OPTIMIZER_BYTES_PER_PARAM = 30  # Adam step: read fp32 param, grad, m, v; write param, m, v and the 16-bit copy


def element_bytes(precision: str) -> int:
    """Bytes per activation element: 16-bit for bf16 and fp8 training (FP8 only inside the
    GEMMs), 4 when the whole model trains in fp32 (a CPU)."""
    return 4 if precision in ("fp32", "tf32") else 2


def state_bytes(precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter. Mixed precision keeps 16-bit
    weights, fp32 gradients and fp32 master weights + Adam moments (ZeRO paper, sec. 3.1);
    fp32 training has no separate master copy."""
    return (4, 4, 8) if precision in ("fp32", "tf32") else (2, 4, 12)


@dataclass(frozen=True)
class Software:
    """What the training stack does, as opposed to what the layout is."""

    flash_attention: bool = True  # attention scores never stored (Dao et al. 2022)
    overlap_dp: bool = True  # gradient reduce / weight gather overlap backward / forward
    overlap_tp: bool = False  # tensor-parallel collectives overlap GEMMs (TE tp-comm-overlap)
    grad_reduce_bytes: int = 4  # fp32 gradient reduction (2 for 16-bit, as 2021 Megatron/DeepSpeed)
    # Data-parallel collectives that use every NIC of a node and NVLink inside it (NCCL rings
    # and trees do); False models collectives limited to one NIC's rate per GPU, as DeepSpeed's
    # 2021 ZeRO-3 measured (Narayanan et al. 2021 Table 2: throughput falls as 1/dp).
    hierarchical_dp: bool = True
    # Sharding strategies (parallel.layout.SHARDING) the training stack implements.
    # supercluster's trainer: replicas, FSDP2 keeping weights gathered, FSDP2 full shard;
    # Megatron-LM's distributed optimizer is "optimizer", DeepSpeed has every one.
    shardings: tuple = TRAINER_SHARDING


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    seq_len: int
    global_batch: int  # sequences per optimizer step


@dataclass(frozen=True)
class System:
    accelerator: Accelerator
    node: NodeType
    precision: str = "bf16"  # dtype of the matmuls (fp8: FP8 GEMMs, 16-bit elsewhere)


@dataclass
class Estimate:
    layout: Layout
    step_time_s: float
    compute_s: float  # forward + backward (+ recompute) of all microbatches, bubble excluded
    bubble_s: float
    exposed_comm_s: float
    optimizer_s: float
    bubble_fraction: float  # (p-1)/(v*m), Narayanan et al. 2021 sec. 2.2.2
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    hfu: float
    memory: dict = field(default_factory=dict)  # GiB per GPU by kind, plus "total"

    @property
    def memory_gib_per_gpu(self) -> float:
        return self.memory["total"]

    def as_dict(self) -> dict:
        out = asdict(self.layout)
        out.update(
            dp=self.layout.dp,
            stage_layers=list(self.layout.stage_layers) if self.layout.stage_layers is not None else None,
            step_time_s=self.step_time_s,
            tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
            model_tflops_per_gpu=self.model_tflops_per_gpu,
            hardware_tflops_per_gpu=self.hardware_tflops_per_gpu,
            mfu=self.mfu,
            hfu=self.hfu,
            memory_gib_per_gpu=self.memory_gib_per_gpu,
            memory_breakdown_gib=dict(self.memory),
            bubble_fraction=self.bubble_fraction,
            exposed_comm_s=self.exposed_comm_s,
            compute_s=self.compute_s,
            bubble_s=self.bubble_s,
            optimizer_s=self.optimizer_s,
        )
        return out


def load_constants() -> dict:
    """The fitted constants, as `python -m supercluster.plan.calibrate` wrote them."""
    return json.loads(CONSTANTS_FILE.read_text())["constants"]


# ---- rates ---------------------------------------------------------------------------------


class Rates:
    """Seconds for a GEMM, a memory-bound pass and a collective on this system."""

    def __init__(self, system: System, constants: dict):
        acc, node = system.accelerator, system.node
        self.peak = acc.peak(system.precision) * 1e12  # FLOP/s, for MFU
        # GEMMs run at the measured best-case matmul rate times the one fitted constant: the
        # share of it a training framework's kernels keep at their own shapes.
        self.gemm_rate = acc.achievable(system.precision) * 1e12 * constants["gemm_efficiency"]
        self.hbm = acc.hbm_tbps * 1e12 * MEMORY_EFFICIENCY  # bytes/s
        self.elem = element_bytes(system.precision)  # activation bytes
        self.act_bytes = 1 if system.precision == "fp8" else self.elem  # GEMM operand bytes
        self.cpu = acc.vendor == "cpu"
        self.launch = 0.0 if self.cpu else KERNEL_LAUNCH_S
        self.latency = 0.0 if self.cpu else COLLECTIVE_LATENCY_S
        # Scale-up bus bandwidth (one direction): the operator's all-reduce pass mark when
        # published (it is measured NCCL bus bandwidth), else the datasheet rate derated.
        self.up = (node.allreduce_busbw_gbps or LINK_EFFICIENCY * node.scale_up_gbps / 2) * 1e9
        self.out = LINK_EFFICIENCY * node.scale_out_gbps_per_gpu / 8 * 1e9  # bytes/s per GPU
        self.gpus_per_node = node.gpus_per_node

    def gemm(self, m: float, k: float, n: float, batch: float = 1) -> float:
        """`batch` (m x k) @ (k x n) matmuls in one kernel: FLOPs at the achievable rate plus
        operand traffic.

        Summing (not max-ing) compute and memory time is what makes skinny or small GEMMs
        slower per FLOP than big square ones: the shape dependence of GEMM efficiency.
        """
        flops = 2 * m * k * n
        traffic = self.act_bytes * (m * k + k * n) + self.elem * m * n
        return batch * (flops / self.gemm_rate + traffic / self.hbm) + self.launch

    def memory_pass(self, nbytes: float) -> float:
        return nbytes / self.hbm

    def link(self, span: int) -> float:
        """Bus bandwidth for a group whose ranks lie within `span` consecutive ranks."""
        return self.up if span <= self.gpus_per_node else self.out

    def ring(self, nbytes: float, n: int, bandwidth: float, passes: int = 1) -> float:
        """`passes` x a reduce-scatter or all-gather of `nbytes` over n ranks (2 = all-reduce)."""
        if n <= 1:
            return 0.0
        return passes * ((n - 1) / n * nbytes / bandwidth + self.latency)

    def hierarchical(self, nbytes: float, n: int, local: int, passes: int = 1, topology_aware: bool = True) -> float:
        """A ring collective over n ranks, `local` of them per node: inside the node over the
        scale-up link, then across nodes on each GPU's own NIC with 1/local of the bytes."""
        if not topology_aware:
            return self.ring(nbytes, n, self.out if n > local else self.up, passes)
        local = max(1, min(local, n))
        inside = self.ring(nbytes, local, self.up, passes)
        across = self.ring(nbytes / local, n // local, self.out, passes)
        return inside + across


# ---- FLOPs and bytes of one layer ------------------------------------------------------------


def _layer_time(cfg: ModelConfig, lay: Layout, sw: Software, r: Rates, s: int) -> tuple[float, float, float]:
    """(forward, backward, recompute) seconds of one transformer layer for one microbatch on
    one GPU, compute only. Tokens are split over cp, weights over tp."""
    t, b, h = lay.tp, lay.microbatch, cfg.hidden
    tokens = b * s / lay.cp
    kv = cfg.kv_heads * cfg.head_dim
    f = cfg.ffn_hidden
    up_cols = 2 * f if cfg.mlp == "swiglu" else f
    # The four linear blocks of Megatron's TP split (Narayanan sec. 2.3, Fig. 5).
    linears = [
        r.gemm(tokens, h, (h + 2 * kv) / t),  # QKV, column-parallel
        r.gemm(tokens, h / t, h),  # attention output, row-parallel
        r.gemm(tokens, h, up_cols / t),  # MLP up (and gate), column-parallel
        r.gemm(tokens, f / t, h),  # MLP down, row-parallel
    ]
    linear_fwd = sum(linears)
    # Attention scores and values: 4*b*s^2*h FLOPs forward (Narayanan eq. 3 appendix), each
    # head a (s x d) @ (d x s) batched GEMM. With cp a rank holds s/cp queries and all keys.
    heads = cfg.heads / t
    d = cfg.head_dim
    q_len = s / lay.cp
    if sw.flash_attention:
        # One fused kernel: causal masking skips half the square; backward recomputes the
        # scores (2.5x forward, Dao 2023). No s^2 traffic to memory.
        attn_fwd = 2 * r.gemm(q_len, d, s, batch=b * heads) / 2
        attn_bwd = 2.5 * attn_fwd
        softmax_bytes = 0.0
    else:
        # Unfused (2021-era): full squares; scores written, softmax/dropout read and write them.
        attn_fwd = 2 * r.gemm(q_len, d, s, batch=b * heads)
        attn_bwd = 2 * attn_fwd
        softmax_bytes = r.elem * 4 * b * heads * q_len * s  # 4 passes over a*s elements
    # Elementwise work (norms, activation, residual, dropout) is memory-bound: the tensors
    # Korthikanti counts (34 bytes per token*h in 16 bits, i.e. 17 elements) are each written
    # once and read once, 34 elements of traffic. Without sequence parallelism the
    # norm/dropout/residual part (10 of the 34) is repeated on every tp rank.
    replicated = 10 * tokens * h
    sharded = 24 * tokens * h / t
    if lay.sequence_parallel:
        replicated /= t
    elementwise_fwd = r.memory_pass(r.elem * (replicated + sharded) + softmax_bytes)
    forward = linear_fwd + attn_fwd + elementwise_fwd
    # Backward: two GEMMs per forward GEMM (data and weight gradients), elementwise twice.
    backward = 2 * linear_fwd + attn_bwd + 2 * elementwise_fwd
    if lay.recompute == "full":
        recompute = forward
    elif lay.recompute == "selective":  # recompute only the attention core (Korthikanti sec. 4.2)
        recompute = attn_fwd + r.memory_pass(softmax_bytes)
    else:
        recompute = 0.0
    return forward, backward, recompute


def _logits_time(cfg: ModelConfig, lay: Layout, r: Rates, s: int) -> float:
    """Forward + backward of the vocabulary-parallel output layer and its cross-entropy."""
    tokens = lay.microbatch * s / lay.cp
    gemm = r.gemm(tokens, cfg.hidden, cfg.vocab_size / lay.tp)
    loss = r.memory_pass(4 * 4 * tokens * cfg.vocab_size / lay.tp)  # fp32 logits, ~4 passes
    return 3 * gemm + loss


# ---- memory ------------------------------------------------------------------------------------


def _activation_bytes_per_layer(cfg: ModelConfig, lay: Layout, sw: Software, s: int) -> float:
    """Korthikanti et al. 2022, eq. 1-4 and Table 2, for b sequences of s/cp tokens.

    34 = 10 (norm inputs, QKV and MLP inputs, dropout masks; replicated across tp unless
    sequence parallel) + 24 (Q, K, V, attention output, MLP hidden; split by tp), generalised
    here to grouped K/V and the MLP's width; 5*a*s/h is the stored attention scores, which
    flash attention and selective recompute both avoid.
    """
    b, h, t = lay.microbatch, cfg.hidden, lay.tp
    sbh = (s / lay.cp) * b * h
    if lay.recompute == "full":
        return 2 * sbh / (t if lay.sequence_parallel else 1)  # only the layer input
    kv = cfg.kv_heads * cfg.head_dim
    dropout = 2 if cfg.mlp == "gelu" else 0  # GPT-style dropout masks, 1 byte each
    mlp = (6 if cfg.mlp == "swiglu" else 4) * cfg.ffn_hidden / h
    sharded = 2 + 4 * kv / h + 2 + mlp  # = 24 for GPT (kv = h, ffn = 4h)
    replicated = 8 + dropout  # = 10 for GPT
    scores = 0.0 if (sw.flash_attention or lay.recompute == "selective") else 5 * cfg.heads * s / h / lay.cp
    if lay.sequence_parallel:
        return sbh / t * (replicated + sharded + scores)
    return sbh * (replicated + (sharded + scores) / t)


def rank_layers(cfg: ModelConfig, lay: Layout) -> list[tuple[int, bool]]:
    """(layers, holds the last stage) for each pipeline rank, from the layout's stage split."""
    if lay.pp == 1:
        return [(cfg.layers, True)]
    split, last = lay.split(cfg), lay.num_stages - 1
    return [(sum(split[i] for i in lay.stage_ids(r)), last in lay.stage_ids(r)) for r in range(lay.pp)]


def stage_layers(cfg: ModelConfig, lay: Layout) -> int:
    """Layers on the busiest pipeline rank."""
    return max(n for n, _ in rank_layers(cfg, lay))


# Which model state each sharding strategy splits over the data-parallel ranks: (weights,
# gradients, optimizer). "keep_gathered" holds whole weights from forward to backward.
SHARDED_STATE = {
    "none": (False, False, False),
    "optimizer": (False, False, True),
    "keep_gathered": (False, True, True),
    "full": (True, True, True),
}


def memory(
    cfg: ModelConfig, lay: Layout, sw: Software, s: int, microbatches: int, reserved_gib: float, precision: str = "bf16"
) -> dict:
    """GiB per GPU on the busier of the first and last pipeline stages."""
    w_bytes, g_bytes, o_bytes = state_bytes(precision)
    scale = element_bytes(precision) / 2  # Korthikanti counts 16-bit activations
    t, p, v = lay.tp, lay.pp, lay.virtual_stages
    shards = lay.dp * lay.cp  # ZeRO shards over every rank that holds the same weights
    embed = cfg.vocab_size * cfg.hidden
    per_layer = layer_params(cfg)
    layers = stage_layers(cfg, lay)
    act_layer = _activation_bytes_per_layer(cfg, lay, sw, s) * scale
    tokens = lay.microbatch * s / lay.cp
    logits = 2 * 4 * tokens * cfg.vocab_size / t  # fp32 logits and their gradient
    working = 0.0
    if lay.recompute == "full":  # one layer's activations rebuilt at a time
        working = _activation_bytes_per_layer(cfg, replace(lay, recompute="selective"), sw, s) * scale
    stages = []
    for first in (True, False) if p > 1 else (True,):
        # The first stage holds the embedding, the last the output layer (a copy of the
        # embedding when tied, as Megatron keeps it); with p == 1 both live on one rank.
        heads = 1 if (p > 1 or cfg.tie_embeddings) else 2
        params = (layers * per_layer + heads * embed) / t
        # 1F1B: the first stage keeps min(p, m) microbatches in flight, the last one;
        # interleaving adds (1 + (p-1)/(p*v)) (Korthikanti sec. 4.2.3).
        in_flight = min(p, microbatches) if first else 1
        interleave = 1 + (p - 1) / (p * v) if (v > 1 and first) else 1
        act = act_layer * layers * (in_flight if first else 1) * interleave
        shard_w, shard_g, shard_o = SHARDED_STATE[lay.sharding]
        weights = w_bytes * params / (shards if shard_w else 1)
        grads = g_bytes * params / (shards if shard_g else 1)
        optimizer = o_bytes * params / (shards if shard_o else 1)
        buffers = working + (logits if (not first or p == 1) else 0.0)
        if shard_w:
            buffers += 2 * w_bytes * per_layer / t  # two unsharded layers in flight (prefetch)
        stages.append(
            {
                "weights": weights / 2**30,
                "gradients": grads / 2**30,
                "optimizer": optimizer / 2**30,
                "activations": act / 2**30,
                "buffers": buffers / 2**30 + reserved_gib,
            }
        )
    for stage in stages:
        stage["total"] = sum(stage.values())
    return max(stages, key=lambda st: st["total"])


# ---- one step ------------------------------------------------------------------------------------


def estimate(work: Workload, lay: Layout, system: System, sw: Software = Software(), constants: dict | None = None) -> Estimate:
    cfg, s = work.model, work.seq_len
    r = Rates(system, constants or load_constants())
    t, p, v, c = lay.tp, lay.pp, lay.virtual_stages, lay.cp
    m = work.global_batch // (lay.dp * lay.microbatch)  # microbatches per pipeline per step
    gpus = lay.gpus

    # Compute of the busiest stage for one microbatch (Narayanan eq. 1's t_f + t_b).
    fwd, bwd, rec = _layer_time(cfg, lay, sw, r, s)
    layers = stage_layers(cfg, lay)
    # The busiest pipeline rank sets the pace: its layers, and the output layer where it holds the last stage.
    logits = _logits_time(cfg, lay, r, s)
    per_mb = max(n * (fwd + bwd + rec) + (logits if last else 0.0) for n, last in rank_layers(cfg, lay))

    # Tensor parallel (Narayanan sec. 3.2): per layer 2 all-reduces forward and 2 backward of
    # b*s*h activations (with sequence parallelism, all-gather + reduce-scatter pairs: the same
    # bytes); a full recompute repeats the forward pair.
    act_bytes = r.elem * lay.microbatch * (s / c) * cfg.hidden
    tp_rounds = 4 + (2 if lay.recompute == "full" else 0)
    tp_comm = layers * tp_rounds * r.ring(act_bytes, t, r.up, passes=2) if t > 1 else 0.0
    if sw.overlap_tp:
        # Transformer Engine splits each all-gather / reduce-scatter into chunks that run
        # under the GEMM consuming or producing them: two of the four linears per collective
        # pair, so about half of the layer's compute is a window to hide them in.
        tp_comm = max(0.0, tp_comm - layers * (fwd + bwd) / 2)
    # Context parallel (Llama 3 sec. 3.3.2): all-gather K and V forward, reduce-scatter their
    # gradients backward, over the cp ranks next to tp in rank order.
    kv_bytes = 2 * r.elem * lay.microbatch * s * cfg.kv_heads * cfg.head_dim / t
    cp_comm = layers * 2 * r.ring(kv_bytes, c, r.link(t * c)) if c > 1 else 0.0
    # Pipeline point-to-point (Narayanan sec. 4.1): b*s*h per boundary each way, /t with the
    # scatter/gather optimisation or sequence parallelism; v times as many with interleaving.
    p2p = 0.0
    if p > 1:
        p2p_bytes = act_bytes / (t if (t > 1) else 1)
        link = r.up if t * c * lay.dp < r.gpus_per_node else r.out
        p2p = 2 * v * (p2p_bytes / link + r.latency)
    per_mb_total = per_mb + tp_comm + cp_comm + p2p

    # Pipeline schedule (Narayanan eq. 1 with interleaving): (m + (p-1)/v) stage-times.
    bubble = (p - 1) / v * per_mb_total
    pipeline = m * per_mb_total + bubble

    # Data parallel over dp*cp ranks holding the same weights (Rajbhandari et al. 2020):
    # replicas all-reduce gradients; sharded optimizer state reduce-scatters gradients and
    # all-gathers updated 16-bit weights; FSDP gathers weights for every microbatch's forward
    # ("keep_gathered": kept for its backward, and a pipeline keeps them across microbatches)
    # and again for its backward ("full").
    n = lay.dp * c
    local = min(n, max(1, r.gpus_per_node // t))  # ranks are ordered tp, cp, dp, pp (tp innermost)
    stage_params = (layers * layer_params(cfg) + cfg.vocab_size * cfg.hidden) / t
    grad_bytes = sw.grad_reduce_bytes * stage_params
    weight_bytes = state_bytes(system.precision)[0] * stage_params
    aware = sw.hierarchical_dp
    if lay.sharding == "none":
        reduce = r.hierarchical(grad_bytes, n, local, passes=2, topology_aware=aware)  # all-reduce
        gather = 0.0
    else:
        reduce = r.hierarchical(grad_bytes, n, local, topology_aware=aware)  # reduce-scatter
        gather = r.hierarchical(weight_bytes, n, local, topology_aware=aware)  # all-gather
        if lay.sharding == "full":
            gather *= 2 * m
        elif lay.sharding == "keep_gathered":
            gather *= 1 if p > 1 else m
    if sw.overlap_dp:
        # Gradients are reduced in buckets while the last microbatch's backward (and the
        # pipeline drain) runs; weights are gathered ahead of the forward pass, and under
        # FSDP ahead of every microbatch's forward and backward.
        reduce_window = bwd * layers + bubble / 2
        gather_window = (fwd + bwd) * layers * m if lay.sharding in ("full", "keep_gathered") else fwd * layers
        exposed_dp = max(0.0, reduce - reduce_window) + max(0.0, gather - gather_window)
    else:
        exposed_dp = reduce + gather

    # Optimizer step: memory-bound Adam over this rank's shard of the parameters.
    opt_params = stage_params / (n if lay.sharding != "none" else 1)
    optimizer = r.memory_pass(OPTIMIZER_BYTES_PER_PARAM * opt_params)

    step = pipeline + exposed_dp + optimizer
    exposed = m * (tp_comm + cp_comm + p2p) + exposed_dp

    # FLOPs as the papers count them: model FLOPs (Korthikanti eq. 7, via flops_per_token)
    # and hardware FLOPs adding what recomputation repeats (eq. 3 for full, eq. 8 in spirit
    # for selective: the attention forward once more).
    tokens = work.global_batch * s
    model_flops = flops_per_token(cfg, s) * tokens
    attention_fwd = 4 * cfg.layers * s * cfg.hidden
    layer_fwd = 2 * (matmul_params(cfg) - cfg.vocab_size * cfg.hidden) + attention_fwd  # no LM head
    extra = {"none": 0.0, "selective": attention_fwd, "full": layer_fwd}[lay.recompute] * tokens
    hardware_flops = model_flops + extra
    model_tflops = model_flops / step / gpus / 1e12
    hardware_tflops = hardware_flops / step / gpus / 1e12
    reserved = 0.0 if r.cpu else RESERVED_GIB
    return Estimate(
        layout=lay,
        step_time_s=step,
        compute_s=m * per_mb,
        bubble_s=bubble,
        exposed_comm_s=exposed,
        optimizer_s=optimizer,
        bubble_fraction=(p - 1) / (v * m),
        tokens_per_s_per_gpu=tokens / step / gpus,
        model_tflops_per_gpu=model_tflops,
        hardware_tflops_per_gpu=hardware_tflops,
        mfu=model_tflops * 1e12 / r.peak,
        hfu=hardware_tflops * 1e12 / r.peak,
        memory=memory(cfg, lay, sw, s, m, reserved, system.precision),
    )

