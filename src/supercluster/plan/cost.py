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

The layout is `parallel.layout.Layout`, the one the trainer runs, and it is charged as the
trainer runs it: "keep_gathered" gathers weights once per step, "full" before every
microbatch's forward and backward, gradients are reduce-scattered once per step; "selective"
recompute repeats the elementwise ops only; uneven pipeline stages are paced by the busiest.
What the software stack does is a named profile (`plan.profiles`); only the constants in
`constants.json` are fitted (by `plan.calibrate`, per profile, against published runs);
everything else is a count of FLOPs and bytes divided by a datasheet rate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from supercluster.hardware.catalog import ACCELERATORS, CHIP_REFERENCE, Accelerator, NodeType
from supercluster.model.config import ModelConfig, attention_flops_per_token, flops_per_token, matmul_params
from supercluster.parallel.layout import Layout
from supercluster.plan import moe
from supercluster.plan.profiles import PROFILES, Software

CONSTANTS_FILE = Path(__file__).with_name("constants.json")

# Physical constants, not fitted (each is a property of the hardware or software stack):
LINK_EFFICIENCY = 0.8  # NCCL ring bus bandwidth / line rate where no pass mark is published (A100: 228 of 300 GB/s)
MEMORY_EFFICIENCY = 0.8  # STREAM-like kernels reach ~80% of HBM peak
KERNEL_LAUNCH_S = 5e-6  # per GEMM / collective launch on a GPU
COLLECTIVE_LATENCY_S = 20e-6  # per ring collective or p2p message across IB (NCCL base latency, order of 10-30 us)
RESERVED_GIB = 2.0  # CUDA/ROCm context, NCCL buffers and allocator slack per GPU
# A layout predicted over HBM by at most this share is answered with a warning, not refused:
# the memory model's error against published peaks (torchtitan's runs, calibration/README.md)
# is of this order, and a run that was published did fit.
MEMORY_MARGIN = 0.10
# Compute that runs while an overlapped collective does is slowed: the collective's kernels
# take SMs and HBM bandwidth. Lee et al. 2025, "Characterizing Compute-Communication Overlap
# in GPU-Accelerated Distributed Deep Learning" (arXiv:2507.03114), measure an average
# computational slowdown of 18.9% (at most 40%) against the same compute with no
# communication, for GPT and Llama training on A100, H100, MI250 and MI210. Charged on the
# data-parallel collectives the model hides (gradient reduce, FSDP weight gathers).
OVERLAP_SLOWDOWN = 0.189
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
class Workload:
    model: ModelConfig
    seq_len: int
    global_batch: int  # sequences per optimizer step
    moe_imbalance: float = moe.DEFAULT_IMBALANCE  # busiest ep rank's tokens / the mean (MoE models)


@dataclass(frozen=True)
class System:
    accelerator: Accelerator
    node: NodeType
    precision: str = "bf16"  # dtype of the matmuls (fp8: FP8 GEMMs, 16-bit elsewhere)



def flash_attention_bandwidth(acc: Accelerator) -> float:
    """TB/s at which the flash-attention stand-in's s x s output write is charged.

    A flash-attention kernel keeps its score tiles in on-chip SRAM: it reads Q, K, V and
    writes O, Theta(N^2 d^2 / M) HBM accesses for SRAM of M elements, against Theta(N^2) for
    standard attention (Dao et al. 2022, "FlashAttention", arXiv:2205.14135, sec. 3.2 and
    Theorem 2): at head dimension 128 it is bound by the SMs, not by HBM. The write of the
    score square that `_layer_classes` charges is a stand-in for the kernel's utilisation on
    its architecture (FlashAttention-2 keeps about 35% of an H100's peak and 50-73% of an
    A100's: Shah et al. 2024, arXiv:2407.08608, sec. 1; Dao 2023, arXiv:2307.08691, sec. 4.1),
    as the papers measured it on the die's full-power SXM part (`catalog.CHIP_REFERENCE`).
    A part built on the same die runs the kernel at its own clocks whatever memory it carries:
    the reference part's bandwidth scaled by the ratio of the two parts' measured matmul rates
    (a proxy for SM clocks). So Grand Teton's 500 W H100 with 2.4 TB/s HBM2e runs flash
    attention 10% slower than an SXM H100, not 28%, and an H200 (4.8 TB/s HBM3e, H100 clocks)
    runs it as an H100 does. Parts without a reference keep their own bandwidth.
    """
    ref = ACCELERATORS.get(CHIP_REFERENCE.get(acc.chip, ""))
    if ref is None:
        return acc.hbm_tbps
    return ref.hbm_tbps * acc.achievable("bf16") / ref.achievable("bf16")


# PyTorch's ring attention (torch/distributed/tensor/experimental/_attention.py:
# `_templated_ring_attention`, `_templated_ring_attention_backward`, `_SDPAMerger` with
# `_ContextParallelOptions.convert_to_f32=True`, round-robin load balancing): HBM bytes per
# element of the rank's local Q (b x s/cp x heads x head_dim; K and V repeated to every head
# are as large) that its eager tensor ops move besides the attention kernels, on the last cp
# rank (every later step runs its full queries against half a K/V chunk: full-size merges).
# Forward, each later step: the K/V concatenation for the rotation (read 4, write 4) and the
# fp32 merge: block output to fp32 (2 + 4), out - block (8 + 4), times the sigmoid weight
# (4 + 4), out minus that (8 + 4); per call the merged output back to 16 bits (4 + 2).
TORCH_RING_FWD_STEP_BYTES = 8 + 38
TORCH_RING_FWD_CALL_BYTES = 6
# Backward, per call: zeroed fp32 dQ, dK, dV (12), the first step's dK and dV added (2 x 10),
# the final casts of dQ (4 + 2) and of the rotated dK/dV (8 + 4); every step: dK/dV
# concatenated in fp32 for the all-to-all to the next rank (8 + 8) and dQ accumulated (6 + 4);
# each later step: the K/V concatenation (8) and dK, dV each added into half of the received
# fp32 buffer and rebuilt by torch.cat (2 x (5 + 8)). The all-to-alls themselves run on NCCL's
# stream under the next step's kernel.
TORCH_RING_BWD_CALL_BYTES = 12 + 20 + 6 + 12
TORCH_RING_BWD_STEP_BYTES = 16 + 10
TORCH_RING_BWD_LATER_STEP_BYTES = 8 + 26


def torch_ring_bytes(cp: int, elements: float) -> tuple[float, float]:
    """(forward, backward) HBM bytes PyTorch's ring attention moves outside the attention
    kernels for one attention call over `cp` ranks, `elements` the rank's local query elements
    (`Software.torch_ring_cp`; none without context parallelism)."""
    if cp <= 1:
        return 0.0, 0.0
    forward = (cp - 1) * TORCH_RING_FWD_STEP_BYTES + TORCH_RING_FWD_CALL_BYTES
    backward = TORCH_RING_BWD_CALL_BYTES + cp * TORCH_RING_BWD_STEP_BYTES + (cp - 1) * TORCH_RING_BWD_LATER_STEP_BYTES
    return forward * elements, backward * elements


EAGER_TRAFFIC = 3.0  # eager elementwise ops: each op re-reads and re-writes (~3 kernels per fused one)


def eager_traffic(cfg: ModelConfig, sw: Software) -> float:
    """How many times the fused elementwise traffic a layer moves when torch.compile is off.

    The penalty comes from ops that eager PyTorch runs as a chain of small kernels, each
    reading and writing the whole tensor: RMSNorm written out in Python (square, mean, rsqrt,
    two multiplies), SwiGLU's silu-and-multiply, rotary embeddings (complex view, multiply,
    real view). LayerNorm and GELU are single ATen kernels forward and backward
    (`native_layer_norm`, `gelu` in PyTorch's native_functions.yaml), and learned positions
    are one add: a GPT-2-style block (LayerNorm, GELU, learned positions) moves in eager about
    the bytes the fused count already charges. Measured: MosaicML's MPT benchmarks (eager
    PyTorch FSDP, calibration/README.md, `mosaicml-2023`) sit 20-30% above the 3x charge at
    short sequences and within about 10% of the 1x one; torchtitan's Llama 3.1 8B loses
    14% without compile (5,762 vs 6,667 tokens/s), which the 3x charge reproduces.
    """
    if sw.fused_elementwise:
        return 1.0
    decomposed = cfg.norm == "rmsnorm" or cfg.mlp == "swiglu" or cfg.position == "rope"
    return EAGER_TRAFFIC if decomposed else 1.0
# Bytes per operand element that casting to FP8 moves, per GEMM, by scaling recipe:
# tensorwise: a separate amax pass over the tensor (read 2), then read 2 and write 1; its FP8
# transpose is valid for the backward GEMMs. rowwise: the amax of a row fuses into the cast
# (read 2, write 1), but the transposed operand of the backward needs its own scales along
# the other axis: two casts. mxfp8: as rowwise, plus one 1-byte E8M0 scale per 32 elements.
# delayed (Transformer Engine's default until 2025): the scale comes from earlier steps' amax
# history, so no amax pass: read 2, write 1.
FP8_CAST_BYTES = {"tensorwise": 5.0, "delayed": 3.0, "rowwise": 6.0, "mxfp8": 2 * (3 + 1 / 32)}
# A stack that fuses the cast into the kernel producing the activation (Transformer Engine's
# LayerNormLinear and fused activations) pays only the extra FP8 write, plus the amax-then-
# cast pass that current scaling needs; it keeps the weights' FP8 copies across microbatches
# (TE's weight caching), so per microbatch only activations are cast.
FP8_FUSED_CAST_BYTES = {"tensorwise": 3.0, "delayed": 1.0, "rowwise": 6.0, "mxfp8": 2 * (1 + 1 / 32)}


@dataclass
class Estimate:
    layout: Layout
    stack: str  # the software profile this prediction assumed
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
    warnings: list = field(default_factory=list)  # why this prediction is shaky, one sentence each
    terms: dict = field(default_factory=dict)  # seconds per term of the step, summing to step_time_s
    # The INTERVAL_COVERAGE range of step time and MFU (set by `add_interval`; None before).
    step_time_s_low: float | None = None
    step_time_s_high: float | None = None
    mfu_low: float | None = None
    mfu_high: float | None = None
    interval_class: str | None = None

    @property
    def memory_gib_per_gpu(self) -> float:
        return self.memory["total"]

    def as_dict(self) -> dict:
        out = asdict(self.layout)
        out["stage_layers"] = list(self.layout.stage_layers) if self.layout.stage_layers else None
        out.update(
            dp=self.layout.dp,
            stack=self.stack,
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
            warnings=list(self.warnings),
            terms_s=dict(self.terms),
            step_time_s_low=self.step_time_s_low,
            step_time_s_high=self.step_time_s_high,
            mfu_low=self.mfu_low,
            mfu_high=self.mfu_high,
            interval_class=self.interval_class,
        )
        return out


def load_constants(stack: str | None = None) -> dict:
    """The fitted constants of one profile (all profiles when `stack` is None), as
    `python -m supercluster.plan.calibrate` wrote them."""
    stored = json.loads(CONSTANTS_FILE.read_text())["constants"]
    return stored if stack is None else stored[stack]


# ---- uncertainty ------------------------------------------------------------------------------
INTERVAL_COVERAGE = 0.8  # the share of left-out published runs each interval is built to hold


def interval_class(stack: str, precision: str, moe_model: bool = False) -> str:
    """The class whose leave-one-source-out residuals bound a prediction: stack, precision,
    and whether the model has experts (MoE predictions miss by more)."""
    return f"{stack}/{'fp8' if precision == 'fp8' else '16-bit'}" + ("/moe" if moe_model else "")


def load_intervals() -> dict:
    """class -> [low, high] ratio of the true step time to the predicted one, at
    INTERVAL_COVERAGE, from the leave-one-source-out residuals (`plan.calibrate`); "all" is
    the pooled fallback for classes with too few rows."""
    return json.loads(CONSTANTS_FILE.read_text()).get("intervals", {})


def add_interval(est: "Estimate", precision: str, intervals: dict, moe_model: bool = False) -> "Estimate":
    """Set the estimate's step time and MFU ranges from its class's residuals."""
    key = interval_class(est.stack, precision, moe_model)
    low, high = (intervals.get(key) or intervals.get("all") or {"ratio": [1.0, 1.0]})["ratio"]
    est.step_time_s_low, est.step_time_s_high = est.step_time_s * low, est.step_time_s * high
    est.mfu_low, est.mfu_high = est.mfu / high, est.mfu / low
    est.interval_class = key if key in intervals else "all"
    return est


# ---- rates ---------------------------------------------------------------------------------


class Rates:
    """Seconds for a GEMM, a memory-bound pass and a collective on this system."""

    def __init__(self, system: System, sw: Software, constants: dict):
        acc, node = system.accelerator, system.node
        precision = system.precision
        self.fp8 = precision == "fp8"
        self.peak = acc.peak("bf16" if self.fp8 else precision) * 1e12  # MFU against the 16-bit peak
        # GEMMs run at the measured best-case matmul rate times the profile's fitted share of it
        # that its kernels keep at their own shapes. FP8 runs only the linear layers in FP8
        # (datasheet FP8 rate, measured where available); attention and the rest stay 16-bit.
        # FP8 GEMMs keep their own share (the second constant) of the measured FP8 rate: FP8
        # kernels and their scaling epilogues reach it less or more closely than 16-bit ones.
        eff = constants["gemm_efficiency"]
        self.gemm_rate = acc.achievable("bf16" if self.fp8 else precision) * 1e12 * eff
        self.linear_rate = acc.achievable(precision) * 1e12 * (constants.get("fp8_efficiency", eff) if self.fp8 else eff)
        self.hbm = acc.hbm_tbps * 1e12 * MEMORY_EFFICIENCY  # bytes/s
        self.attention_hbm = flash_attention_bandwidth(acc) * 1e12 * MEMORY_EFFICIENCY
        self.elem = element_bytes(precision)  # activation bytes
        self.cpu = acc.vendor == "cpu"
        self.launch = 0.0 if self.cpu else KERNEL_LAUNCH_S
        self.latency = 0.0 if self.cpu else COLLECTIVE_LATENCY_S
        # Scale-up bus bandwidth (one direction): the operator's all-reduce pass mark when
        # published (it is measured NCCL bus bandwidth), else the datasheet rate derated.
        self.up = (node.allreduce_busbw_gbps or LINK_EFFICIENCY * node.scale_up_gbps / 2) * 1e9
        self.out = LINK_EFFICIENCY * node.scale_out_gbps_per_gpu / 8 * 1e9  # bytes/s per GPU
        self.gpus_per_node = node.gpus_per_node
        # GPU <-> host memory, each way: the measured pass mark, else the datasheet link derated.
        self.host = (node.h2d_gbps or LINK_EFFICIENCY * node.host_link_gbps) * 1e9
        self.cast_fused = sw.fp8_cast_fused
        self.cast_bytes = (FP8_FUSED_CAST_BYTES if sw.fp8_cast_fused else FP8_CAST_BYTES)[sw.fp8_recipe]
        # A module that quantizes its own input (no producing kernel to fuse the cast into):
        # the unfused bytes per input element (`moe.ffn_linear_time`'s grouped expert GEMMs).
        self.own_cast_bytes = FP8_CAST_BYTES[sw.fp8_recipe]
        self.fp8_dispatch = sw.fp8_dispatch

    def gemm(self, m: float, k: float, n: float, batch: float = 1, linear: bool = False, launches: float = 1,
             own_cast: float | None = None, hbm: float | None = None) -> float:
        """`batch` (m x k) @ (k x n) matmuls in `launches` kernels (one: a batched GEMM): FLOPs
        at the achievable rate plus operand traffic. `linear`: a weight GEMM, FP8 when the run
        trains in FP8 (operands cast with a per-tensor scale first: an amax pass and a cast over
        each operand). `own_cast`: in FP8, the bytes per input element of a cast the GEMM's
        module runs itself on its input, in place of the stack's default; its weights' FP8
        copies are kept across microbatches (Transformer Engine's GroupedLinear). `hbm`: the
        bandwidth its traffic is charged at, when not the part's own (flash attention).

        Summing (not max-ing) compute and memory time is what makes skinny or small GEMMs
        slower per FLOP than big square ones: the shape dependence of GEMM efficiency.
        """
        flops = 2 * m * k * n
        fp8 = linear and self.fp8
        rate = self.linear_rate if linear else self.gemm_rate
        traffic = (1 if fp8 else self.elem) * (m * k + k * n) + self.elem * m * n
        if fp8 and own_cast is not None:
            traffic += own_cast * m * k
        elif fp8:
            traffic += self.cast_bytes * (m * k + (0 if self.cast_fused else k * n))
        return batch * (flops / rate + traffic / (hbm or self.hbm)) + launches * self.launch

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


def _elementwise_elements(cfg: ModelConfig, ffn: float | None = None, dispatch: float = 0.0) -> tuple[float, float, float]:
    """Per token, in units of h: (replicated across tp unless sequence parallel, split by tp,
    recomputable by "selective") elements the elementwise ops of one layer write.

    Korthikanti et al. 2022 count 34 bytes per token*h for GPT (17 16-bit elements): 10 bytes
    replicated across tp (two norm inputs, two norm outputs, dropout masks) and 24 split
    (Q, K, V, attention output, MLP hidden). The elementwise outputs (norm outputs, the
    activation's output, dropout masks) are what "selective" recompute drops and rebuilds.
    """
    h = cfg.hidden
    f = cfg.ffn_hidden if ffn is None else ffn  # a MoE layer: its token's experts' total width
    kv = cfg.kv_heads * cfg.head_dim
    q = cfg.heads * cfg.head_dim
    dropout = 1 if cfg.mlp == "gelu" else 0  # GPT-style dropout masks, 1 byte = half an element
    mlp_hidden = (3 if cfg.mlp == "swiglu" else 2) * f / h  # up (+gate) + activation out
    replicated = 4 + dropout  # two norm inputs and outputs, masks
    # Q, K+V, attention out, MLP; a MoE layer adds its dispatched and combined token copies.
    sharded = q / h + 2 * kv / h + q / h + mlp_hidden + dispatch
    recomputable = 2 + dropout + f / h  # norm outputs, masks, activation output
    return replicated, sharded, recomputable


def _mla_up_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(rank, output columns) of MLA's up-projection GEMMs (Megatron-Core's linear_q_up_proj
    and linear_kv_up_proj: what recompute module "mla_up_proj" repeats); none without MLA or,
    for the query, without its low-rank projection (a full wq is no up-projection)."""
    if getattr(cfg, "attention", "gqa") != "mla":
        return []
    d = cfg.head_dim
    shapes = [(cfg.kv_lora_rank, cfg.heads * (d + cfg.v_head_dim))]
    if cfg.q_lora_rank:
        shapes.insert(0, (cfg.q_lora_rank, cfg.heads * (d + cfg.rope_head_dim)))
    return shapes


def _module_recompute_flops_per_token(cfg: ModelConfig, s: int, modules: tuple[str, ...]) -> float:
    """Forward FLOPs per token, over all layers, that Megatron-Core's module recompute repeats:
    each named module's matmuls again (2 per weight; the attention core as Korthikanti eq. 8).
    "moe_act" and "layernorm" are elementwise: no FLOPs."""
    n_moe = moe.moe_layers(cfg)
    flops = attention_flops_per_token(cfg, s) if "core_attn" in modules else 0.0
    if "mla_up_proj" in modules:
        flops += 2 * cfg.layers * sum(k * n for k, n in _mla_up_shapes(cfg))
    if "mlp" in modules:  # the dense MLP submodule: dense layers only
        flops += 2 * (cfg.layers - n_moe) * (3 if cfg.mlp == "swiglu" else 2) * cfg.hidden * cfg.ffn_hidden
    if n_moe and "moe" in modules:  # router, the token's routed experts and the shared ones
        flops += 2 * n_moe * (cfg.hidden * cfg.moe_experts
                              + (cfg.moe_top_k + cfg.moe_shared_experts) * 3 * cfg.hidden * cfg.moe_hidden)
    elif n_moe and "shared_experts" in modules:
        flops += 2 * n_moe * cfg.moe_shared_experts * 3 * cfg.hidden * cfg.moe_hidden
    return flops


def _layer_time(cfg: ModelConfig, lay: Layout, sw: Software, r: Rates, s: int) -> tuple[float, float, float]:
    """(forward, backward, recompute) seconds of one transformer layer for one microbatch on
    one GPU, compute only. Tokens are split over cp, weights over tp."""
    classes = _layer_classes(cfg, lay, sw, r, s)
    fwd = classes["linear"][0] + classes["attention"][0] + classes["elementwise"][0]
    bwd = classes["linear"][1] + classes["attention"][1] + classes["elementwise"][1]
    return fwd, bwd, classes["recompute"]


def _layer_classes(cfg: ModelConfig, lay: Layout, sw: Software, r: Rates, s: int, moe_layer: bool = False,
                   imbalance: float = 1.0) -> dict:
    """Per op class, (forward, backward) seconds of one layer for one microbatch, and the
    recompute seconds: what `plan --explain` shows. `moe_layer`: its feed-forward is the
    experts (`plan.moe`), `imbalance` the busiest ep rank's share of tokens over the mean."""
    t, b, h = lay.tp, lay.microbatch, cfg.hidden
    tokens = b * s / lay.cp
    kv = cfg.kv_heads * cfg.head_dim
    q = cfg.heads * cfg.head_dim
    f = cfg.ffn_hidden
    up_cols = 2 * f if cfg.mlp == "swiglu" else f
    # The four linear blocks of Megatron's TP split (Narayanan sec. 2.3, Fig. 5).
    if getattr(cfg, "attention", "gqa") == "mla":
        # Multi-head latent attention, costed from its parameter count: its down- and
        # up-projections as one column-parallel GEMM of the same weights (not its kernels).
        attn = (matmul_params(replace(cfg, layers=1, moe_experts=0)) - cfg.vocab_size * h - 3 * h * f) / h
        linears = [r.gemm(tokens, h, attn / t, linear=True)]
    else:
        linears = [
            r.gemm(tokens, h, (q + 2 * kv) / t, linear=True),  # QKV, column-parallel
            r.gemm(tokens, q / t, h, linear=True),  # attention output, row-parallel
        ]
    if moe_layer:
        ffn_linears = [moe.ffn_linear_time(cfg, lay, r, tokens, imbalance)]
    else:
        ffn_linears = [
            r.gemm(tokens, h, up_cols / t, linear=True),  # MLP up (and gate), column-parallel
            r.gemm(tokens, f / t, h, linear=True),  # MLP down, row-parallel
        ]
    linears += ffn_linears
    linear_fwd = sum(linears)
    # Attention scores and values: 4*b*s^2*h FLOPs forward, each head a (s x d) @ (d x s)
    # batched GEMM, 16-bit even in FP8 runs. With cp a rank holds s/cp queries and all keys.
    heads = cfg.heads / t
    d = cfg.head_dim
    if getattr(cfg, "attention", "gqa") == "mla":  # scores over d + rope dims, values of v_head_dim
        d = (cfg.head_dim + cfg.rope_head_dim + cfg.v_head_dim) / 2
    q_len = s / lay.cp
    if sw.flash_attention:
        # One fused kernel: causal masking skips half the square; backward recomputes the
        # scores (2.5x forward, Dao 2023). The kernel keeps its scores on chip, yet it is
        # charged as a GEMM that writes its s x s output: that term is what stands in for
        # flash attention's lower utilisation (FlashAttention-2 reaches ~35% of an H100's
        # peak, Shah et al. 2024). Charging only Q, K, V, O traffic at a fixed 30-35% of peak
        # was tried and predicts the long-context torchtitan runs 15-45% too fast, most at cp 8.
        # That output write is no HBM traffic, so it is charged at the bandwidth of the die's
        # reference part scaled by this part's clocks (`flash_attention_bandwidth`).
        attn_fwd = 2 * r.gemm(q_len, d, s, batch=b * heads, hbm=r.attention_hbm) / 2
        attn_bwd = 2.5 * attn_fwd
        softmax_bytes = 0.0
        if sw.torch_ring_cp and lay.cp > 1:  # the ring's fp32 merges and accumulations
            ring_fwd, ring_bwd = torch_ring_bytes(lay.cp, b * q_len * heads * cfg.head_dim)
            attn_fwd += r.memory_pass(ring_fwd)
            attn_bwd += r.memory_pass(ring_bwd)
    else:
        # Unfused (2021-era): full squares; scores written, softmax/dropout read and write them.
        attn_fwd = 2 * r.gemm(q_len, d, s, batch=b * heads)
        attn_bwd = 2 * attn_fwd
        softmax_bytes = r.elem * 4 * b * heads * q_len * s
    # Elementwise work is memory-bound: each element written once and read once. Without
    # sequence parallelism the norm/residual part is repeated on every tp rank.
    replicated, sharded, recomputable = (_elementwise_elements(cfg, moe.ffn_width(cfg, imbalance), 2 * cfg.moe_top_k)
                                         if moe_layer else _elementwise_elements(cfg))
    if lay.sequence_parallel and t > 1:
        replicated /= t
    elements = 2 * tokens * h * (replicated + sharded / t)
    elementwise_fwd = r.memory_pass(eager_traffic(cfg, sw) * r.elem * elements + softmax_bytes)
    forward = linear_fwd + attn_fwd + elementwise_fwd
    # Backward: two GEMMs per forward GEMM (data and weight gradients), elementwise twice.
    if lay.recompute == "full":
        recompute = forward
    elif lay.recompute == "selective" and sw.recompute_modules:
        recompute = _module_recompute_time(cfg, lay, sw, r, tokens, moe_layer, imbalance, attn_fwd + r.memory_pass(softmax_bytes),
                                           sum(ffn_linears), sharded - 2 * cfg.moe_top_k if moe_layer else sharded)
    elif lay.recompute == "selective" and sw.selective == "attention":
        # Megatron's policy: the attention core (scores, softmax, dropout, values) again.
        recompute = attn_fwd + r.memory_pass(softmax_bytes)
    elif lay.recompute == "selective":
        # The trainer's selective policy keeps matmul and attention outputs and recomputes the
        # elementwise ops that produced what it dropped: a memory-bound pass, no GEMM.
        recompute = elementwise_fwd * recomputable / (replicated + sharded)
    else:
        recompute = 0.0
    return {"linear": (linear_fwd, 2 * linear_fwd), "attention": (attn_fwd, attn_bwd),
            "elementwise": (elementwise_fwd, 2 * elementwise_fwd), "recompute": recompute}


def _module_recompute_time(cfg: ModelConfig, lay: Layout, sw: Software, r: Rates, tokens: float, moe_layer: bool,
                           imbalance: float, core_attn: float, ffn_fwd: float, sharded: float) -> float:
    """Seconds one layer's Megatron-Core module recompute (`Software.recompute_modules`)
    repeats in the backward for one microbatch: each named module's forward, its GEMMs as the
    forward charges them and its elementwise outputs as one memory pass each (elements as
    `_elementwise_elements` counts them). `core_attn`: the attention core's forward;
    `ffn_fwd`: the layer's MLP or MoE GEMMs; `sharded`: the layer's tp-split elements less a
    MoE layer's dispatched copies."""
    mods, t, h = sw.recompute_modules, lay.tp, cfg.hidden
    sp = lay.sequence_parallel and t > 1

    def elementwise(replicated: float = 0.0, split: float = 0.0) -> float:  # as `elementwise_fwd`
        return r.memory_pass(eager_traffic(cfg, sw) * r.elem * 2 * tokens * h * (replicated / (t if sp else 1) + split / t))

    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    mlp_hidden = sharded - 2 * q / h - 2 * kv / h  # up (+gate) and activation out, per token, in h
    shared = cfg.moe_shared_experts * cfg.moe_hidden if moe_layer else 0.0
    time = core_attn if "core_attn" in mods else 0.0
    if "layernorm" in mods:  # the two norm outputs
        time += elementwise(replicated=2)
    if "mla_up_proj" in mods:  # up-projection GEMMs (the RoPE pass is charged with the layer's elementwise work)
        time += sum(r.gemm(tokens, k, n / t, linear=True) for k, n in _mla_up_shapes(cfg))
    if not moe_layer and "mlp" in mods:
        time += ffn_fwd + elementwise(split=mlp_hidden)
    elif moe_layer and "moe" in mods:  # router, experts, shared experts; its dispatch and combine copies too
        time += ffn_fwd + elementwise(split=mlp_hidden + 2 * cfg.moe_top_k)
    elif moe_layer:
        if "shared_experts" in mods and shared:
            time += r.gemm(tokens, h, 2 * shared / t, linear=True) + r.gemm(tokens, shared / t, h, linear=True)
            time += elementwise(split=3 * shared / h)
        if "moe_act" in mods:  # the routed experts' activation outputs
            time += elementwise(split=cfg.moe_top_k * imbalance * cfg.moe_hidden / h)
    return time


def _logits_time(cfg: ModelConfig, lay: Layout, r: Rates, s: int) -> float:
    """Forward + backward of the vocabulary-parallel output layer and its cross-entropy
    (16-bit: FP8 recipes keep the output layer in 16 bits)."""
    tokens = lay.microbatch * s / lay.cp
    gemm = r.gemm(tokens, cfg.hidden, cfg.vocab_size / lay.tp)
    loss = r.memory_pass(4 * 4 * tokens * cfg.vocab_size / lay.tp)  # fp32 logits, ~4 passes
    return 3 * gemm + loss


def _embedding_time(cfg: ModelConfig, lay: Layout, r: Rates, s: int) -> float:
    """Embedding lookup forward and its scatter-add backward: memory-bound, on the first stage."""
    tokens = lay.microbatch * s / lay.cp
    return r.memory_pass(3 * r.elem * tokens * cfg.hidden / (lay.tp if lay.sequence_parallel else 1))


# ---- stages ---------------------------------------------------------------------------------------


def stage_split(cfg: ModelConfig, lay: Layout) -> tuple[int, ...]:
    """Layers per pipeline stage: the layout's own boundaries, else as even as whole layers
    allow (the first stages take one more when the layers do not divide)."""
    if lay.stage_layers:
        return tuple(lay.stage_layers)
    n = lay.num_stages
    if n > cfg.layers:  # Megatron's embedding-only and loss-only stages at the ends
        inner = n - 2
        base, extra = divmod(cfg.layers, inner)
        return (0, *(base + (1 if i < extra else 0) for i in range(inner)), 0)
    base, extra = divmod(cfg.layers, n)
    return tuple(base + (1 if i < extra else 0) for i in range(n))


def rank_layers(cfg: ModelConfig, lay: Layout) -> list[int]:
    """Layers each pipeline rank holds: stage i lives on rank i mod pp (looped placement;
    V schedules place the second half mirrored, which holds the same counts in total)."""
    split = stage_split(cfg, lay)
    per_rank = [0] * lay.pp
    for i, n in enumerate(split):
        rank = i % lay.pp if lay.pp_schedule not in ("zbvzerobubble", "dualpipev") else min(i, lay.num_stages - 1 - i)
        per_rank[rank] += n
    return per_rank


def stage_layers(cfg: ModelConfig, lay: Layout) -> int:
    """Layers on the busiest pipeline rank."""
    return max(rank_layers(cfg, lay))


# ---- memory ------------------------------------------------------------------------------------


def _activation_bytes_per_layer(cfg: ModelConfig, lay: Layout, sw: Software, s: int, fp8: bool = False) -> float:
    """Activation bytes of the mean layer: dense and MoE layers weighted by their counts."""
    n_moe = moe.moe_layers(cfg)
    dense = _activation_bytes(cfg, lay, sw, s, fp8=fp8)
    if not n_moe:
        return dense
    w = n_moe / cfg.layers
    return (1 - w) * dense + w * _activation_bytes(cfg, lay, sw, s, moe.ffn_width(cfg), 2 * cfg.moe_top_k, fp8=fp8)


def _activation_bytes(cfg: ModelConfig, lay: Layout, sw: Software, s: int, ffn: float | None = None,
                      dispatch: float = 0.0, fp8: bool = False) -> float:
    """Korthikanti et al. 2022, eq. 1-4 and Table 2, for b sequences of s/cp tokens, 16-bit,
    generalised to grouped K/V and the MLP's width; 5*a*s/h is the stored attention scores,
    which flash attention never stores. "selective" drops the elementwise outputs (norm and
    activation outputs, dropout masks) and keeps matmul and attention outputs.

    `fp8` (an FP8 run): a stack that casts GEMM inputs to FP8 in the kernel producing them
    (`Software.fp8_cast_fused`, Transformer Engine) saves those FP8 copies for the backward's
    weight-gradient GEMMs instead of the 16-bit tensors: the two norm outputs (inputs of QKV
    and of the MLP's up projection), the attention output (input of the output projection) and
    the MLP activation's output (input of the down projection) are kept at 1 byte, not 2."""
    b, h, t = lay.microbatch, cfg.hidden, lay.tp
    sbh = (s / lay.cp) * b * h
    sp = lay.sequence_parallel and t > 1
    if lay.recompute == "full":
        return 2 * sbh / (t if sp else 1)  # only the layer input
    replicated, sharded, recomputable = (2 * x for x in _elementwise_elements(cfg, ffn, dispatch))  # bytes
    scores = 0.0 if sw.flash_attention else 5 * cfg.heads * s / h / lay.cp
    mods = sw.recompute_modules if lay.recompute == "selective" else ()
    width = cfg.ffn_hidden if ffn is None else ffn
    fp8_norms, fp8_act = 2.0, width / h  # bytes FP8 copies save: the two norm outputs, the activation output
    if mods:
        # Megatron-Core's module recompute: the named modules' saved tensors are not kept (their
        # inputs are: a checkpoint keeps its 16-bit input); Korthikanti's terms, module by module.
        moe_layer = ffn is not None
        q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        if "core_attn" in mods:
            scores = 0.0
        if "layernorm" in mods:  # input_layernorm and pre_mlp_layernorm outputs
            replicated -= 4
            fp8_norms = 0.0
        up = _mla_up_shapes(cfg) if "mla_up_proj" in mods else []
        if up:  # Q, K, V dropped; the up-projections' inputs (the latents, replicated) kept
            sharded -= 2 * (q + 2 * kv) / h
            replicated += 2 * (sum(k for k, _ in up) + cfg.rope_head_dim) / h
        mlp_units = (3 if cfg.mlp == "swiglu" else 2) * width / h  # up (+gate) and activation out
        if ("mlp" in mods and not moe_layer) or ("moe" in mods and moe_layer):
            sharded -= 2 * (mlp_units + dispatch)
            fp8_act, fp8_norms = 0.0, min(fp8_norms, 1.0)  # the pre-MLP norm output: the checkpoint's 16-bit input
        elif moe_layer:
            shared = cfg.moe_shared_experts * cfg.moe_hidden / h
            if "shared_experts" in mods:
                sharded -= 2 * 3 * shared
                fp8_act -= shared
            if "moe_act" in mods:  # routed experts' activation outputs
                sharded -= 2 * (width / h - shared)
                fp8_act -= width / h - shared
    elif lay.recompute == "selective" and sw.selective == "attention":
        scores = 0.0  # Megatron's selective recompute drops the attention core (Korthikanti Table 2: 34 sbh/t)
    elif lay.recompute == "selective":
        # Of the dropped bytes, norm outputs and masks are replicated, the activation output split.
        replicated -= 4 + (2 if cfg.mlp == "gelu" else 0)
        sharded -= 2 * (cfg.ffn_hidden if ffn is None else ffn) / h
    if fp8 and sw.fp8_cast_fused:
        sharded -= cfg.heads * cfg.head_dim / h  # attention output: 1 byte a element, not 2
        if mods:
            replicated -= fp8_norms
            sharded -= fp8_act
        elif not (lay.recompute == "selective" and sw.selective == "elementwise"):  # not already dropped
            replicated -= 2  # the two norm outputs
            sharded -= (cfg.ffn_hidden if ffn is None else ffn) / h  # the activation's output
    if sp:
        return sbh / t * (replicated + sharded + scores)
    return sbh * (replicated + (sharded + scores) / t)


def live_params(cfg: ModelConfig, lay: Layout, sw: Software) -> float:
    """Parameters gathered at once under ZeRO-3 / FSDP "full" sharding, per GPU: two layers
    (the one computing and the one prefetched, FSDP2), or DeepSpeed's cap on live parameters
    (`stage3_max_live_parameters`, 1e9 by default), which gathers module by module but never
    less than the largest single weight."""
    experts = moe.mean_expert_params(cfg)
    two_layers = 2 * (moe.mean_layer_params(cfg) - experts + experts / getattr(lay, "ep", 1)) / lay.tp
    if sw.max_live_params is None:
        return two_layers
    largest = cfg.hidden * max(cfg.ffn_hidden, cfg.hidden) / lay.tp
    return max(largest, min(two_layers, sw.max_live_params))


def memory(
    cfg: ModelConfig, lay: Layout, sw: Software, s: int, microbatches: int, reserved_gib: float, precision: str = "bf16"
) -> dict:
    """GiB per GPU on the pipeline rank that needs the most."""
    w_bytes, g_bytes, o_bytes = state_bytes(precision)
    scale = element_bytes(precision) / 2  # Korthikanti counts 16-bit activations
    t, p, v = lay.tp, lay.pp, lay.stages_per_rank
    shards = lay.dp_shard * lay.cp  # ranks over which the state is sharded (HSDP replicates across dp_replicate)
    if lay.sharding == "optimizer":
        shards = lay.dp * lay.cp
    embed = cfg.vocab_size * cfg.hidden
    per_layer = moe.mean_layer_params(cfg)
    expert_layer, ep = moe.mean_expert_params(cfg), getattr(lay, "ep", 1)
    act_layer = _activation_bytes_per_layer(cfg, lay, sw, s, precision == "fp8") * scale
    tokens = lay.microbatch * s / lay.cp
    logits = 2 * 4 * tokens * cfg.vocab_size / t  # fp32 logits and their gradient
    working = 0.0
    if lay.recompute == "full":  # one layer's activations rebuilt at a time
        working = _activation_bytes_per_layer(cfg, replace(lay, recompute="none"), sw, s, precision == "fp8") * scale
    per_rank = rank_layers(cfg, lay)
    stages = []
    for rank, layers in enumerate(per_rank):
        first, last = rank == 0, rank == p - 1
        heads = (1 if first else 0) + (1 if last and not (p == 1 and cfg.tie_embeddings) else 0)
        dense = (layers * (per_layer - expert_layer) + heads * embed) / t
        experts = layers * expert_layer / (t * ep)  # 1/ep of the stage's experts
        params = dense + experts

        def spread(n: int) -> float:  # the experts are sharded over the ranks left after ep
            return dense / n + experts / max(1, n // ep)
        # 1F1B: rank i keeps min(p - i, m) microbatches in flight; interleaving adds
        # (1 + (p-1)/(p*v)) on the first (Korthikanti sec. 4.2.3).
        in_flight = min(p - rank, microbatches)
        interleave = 1 + (p - 1) / (p * v) if v > 1 else 1
        # Offloaded layers keep their activations in host memory; one is in flight at a time.
        offloaded = min(sw.offload_layers, layers)
        resident = layers - offloaded + min(offloaded, 1)
        act = act_layer * resident * in_flight * interleave
        sharded_weights = lay.sharding == "full"  # keep_gathered holds the whole stage's weights all step
        weights = w_bytes * (spread(shards) if sharded_weights else params)
        grads = g_bytes * (spread(shards) if lay.sharding in ("keep_gathered", "full") else params)
        if sw.accumulate_unsharded_grads and p > 1 and lay.sharding in ("keep_gathered", "full") and shards > 1:
            grads += g_bytes * params  # every microbatch's gradients, unsharded until the last backward
        optimizer = o_bytes * (spread(shards) if lay.sharding != "none" else params)
        buffers = working + (logits if last else 0.0)
        if sharded_weights:
            buffers += w_bytes * live_params(cfg, lay, sw)  # gathered weights in flight (prefetch)
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


def estimate(
    work: Workload, lay: Layout, system: System, sw: Software = PROFILES["supercluster"], constants: dict | None = None
) -> Estimate:
    cfg, s = work.model, work.seq_len
    constants = constants if constants is not None else load_constants(sw.name)
    r = Rates(system, sw, constants)
    t, p, c = lay.tp, lay.pp, lay.cp
    v = lay.stages_per_rank
    m = work.global_batch // (lay.dp * lay.microbatch)  # microbatches per pipeline per step
    gpus = lay.gpus

    # Compute of one microbatch per pipeline rank (Narayanan eq. 1's t_f + t_b): its layers,
    # the embedding on the first rank, the output layer and loss on the last. The busiest
    # rank sets the pace of every stage of the schedule.
    classes = _layer_classes(cfg, lay, sw, r, s)
    n_moe = moe.moe_layers(cfg)
    a2a, a2a_tier = 0.0, "none"
    if n_moe:
        # The mean layer: dense and MoE layers weighted by their counts (stages are balanced
        # by active FLOPs, so every stage holds about the model's mix).
        # Imbalance among ep ranks: with ep 1 every rank holds every expert and gets the mean work.
        imbalance = work.moe_imbalance if lay.ep > 1 else 1.0
        experts = _layer_classes(cfg, lay, sw, r, s, moe_layer=True, imbalance=imbalance)
        w = n_moe / cfg.layers

        def mix(a, b):
            return tuple((1 - w) * x + w * y for x, y in zip(a, b)) if isinstance(a, tuple) else (1 - w) * a + w * b

        classes = {k: mix(classes[k], experts[k]) for k in classes}
        one, a2a_tier = moe.all_to_all_time(cfg, lay, r, lay.microbatch * s / c, imbalance, sw)
        # Dispatch and combine forward, their gradients backward, again in a full recompute.
        a2a = w * (4 + (2 if lay.recompute == "full" else 0)) * one  # per layer, averaged
        if lay.recompute == "selective" and "moe" in sw.recompute_modules:  # the MoE layer's forward pair again
            a2a += w * 2 * one
    fwd = classes["linear"][0] + classes["attention"][0] + classes["elementwise"][0]
    bwd = classes["linear"][1] + classes["attention"][1] + classes["elementwise"][1]
    rec = classes["recompute"]
    layer_time = fwd + bwd + rec
    per_rank = rank_layers(cfg, lay)
    loads = [n * layer_time for n in per_rank]
    embedding, logits = _embedding_time(cfg, lay, r, s), _logits_time(cfg, lay, r, s)
    loads[0] += embedding
    loads[-1] += logits
    busiest = max(range(p), key=loads.__getitem__)
    per_mb = loads[busiest]
    layers = per_rank[busiest]

    # Tensor parallel (Narayanan sec. 3.2): per layer 2 all-reduces forward and 2 backward of
    # b*s*h activations (with sequence parallelism, all-gather + reduce-scatter pairs: the same
    # bytes); a full recompute repeats the forward pair.
    act_bytes = r.elem * lay.microbatch * (s / c) * cfg.hidden
    tp_rounds = 4 + (2 if lay.recompute == "full" else 0)
    if lay.recompute == "selective" and sw.recompute_modules:  # a recomputed MLP or MoE block's forward round
        w_moe = n_moe / cfg.layers
        tp_rounds += ((1 - w_moe) * ("mlp" in sw.recompute_modules) + w_moe * ("moe" in sw.recompute_modules))
    # Each round is an all-gather and a reduce-scatter of the same bytes (an all-reduce's two
    # passes). With FP8 TP all-gathers (`Software.fp8_tp_all_gather`, tensorwise scaling only)
    # the all-gather moves 1-byte elements and the reduce-scatter 16-bit ones: (1 + 2) / 4 of
    # the 16-bit bytes, in the forward, its recompute and the backward alike.
    fp8_tp = system.precision == "fp8" and sw.fp8_tp_all_gather and sw.fp8_recipe == "tensorwise"
    tp_share = (1 + r.elem) / (2 * r.elem) if fp8_tp else 1.0
    tp_comm = layers * tp_rounds * r.ring(tp_share * act_bytes, t, r.up, passes=2) if t > 1 else 0.0
    if sw.overlap_tp:
        # Chunked all-gather / reduce-scatter run under the GEMM consuming or producing them:
        # about half of the layer's compute is a window to hide them in.
        tp_comm = max(0.0, tp_comm - layers * (fwd + bwd) / 2)
    # Context parallel (Llama 3 sec. 3.3.2): all-gather K and V forward, reduce-scatter their
    # gradients backward, over the cp ranks next to tp in rank order.
    kv_bytes = 2 * r.elem * lay.microbatch * s * cfg.kv_heads * cfg.head_dim / t
    cp_passes = 2
    if sw.torch_ring_cp:
        # PyTorch's ring attention with K/V repeated to every head: the repeated K and V are
        # all-gathered in the forward, again in a full recompute, and again in the backward
        # (its K/V rotater); the fp32 dK/dV rotations run under the next step's kernel.
        kv_bytes *= cfg.heads / cfg.kv_heads
        cp_passes = 2 + (1 if lay.recompute == "full" else 0)
    cp_comm = layers * cp_passes * r.ring(kv_bytes, c, r.link(t * c)) if c > 1 else 0.0
    # Pipeline point-to-point (Narayanan sec. 4.1): b*s*h per boundary each way, /t with the
    # scatter/gather optimisation or sequence parallelism; v times as many with interleaving.
    p2p = 0.0
    if p > 1:
        p2p_bytes = act_bytes / t
        link = r.up if t * c * lay.dp < r.gpus_per_node else r.out
        p2p = 2 * v * (p2p_bytes / link + r.latency)
    ep_comm = layers * a2a  # expert-parallel all-to-alls
    if sw.overlap_ep:  # hidden under the other microbatch's layers (DualPipe)
        ep_comm = max(0.0, ep_comm - layers * (fwd + bwd))
    # Activation offload (Megatron-Core cpu_offloading_num_layers): each offloaded layer's
    # saved activations go to host memory during the forward and come back during the
    # backward, on a copy stream under the rank's other compute; what the compute of the
    # pass cannot cover is exposed.
    offload = 0.0
    offloaded = min(sw.offload_layers, layers)
    if offloaded and not r.cpu:
        saved = _activation_bytes_per_layer(cfg, lay, sw, s, system.precision == "fp8") * r.elem / 2
        copy = offloaded * saved / r.host  # each way
        offload = max(0.0, copy - layers * fwd) + max(0.0, copy - layers * bwd)
    per_mb_total = per_mb + tp_comm + cp_comm + p2p + ep_comm + offload

    # Pipeline schedule (Narayanan eq. 1 with interleaving): (m + (p-1)/v) stage-times.
    bubble = (p - 1) / v * per_mb_total
    pipeline = m * per_mb_total + bubble

    # Data parallel over the dp*cp ranks that hold the same weights (Rajbhandari et al. 2020),
    # as the trainer runs each strategy: "none" all-reduces gradients; "optimizer" reduce-
    # scatters them and all-gathers the updated weights; "keep_gathered" all-gathers the
    # weights once per step before the first forward and keeps them through every microbatch
    # and backward; "full" gathers before every microbatch's forward and again for its
    # backward. Gradients are reduce-scattered once per step.
    n = lay.dp * c
    local = min(n, max(1, r.gpus_per_node // t))  # ranks are ordered tp, cp, dp, pp (tp innermost)
    ep = getattr(lay, "ep", 1)
    # A rank's parameters: its stage's dense ones and 1/ep of its stage's experts, whose
    # gradients and gathers run over the ep-times-smaller expert data-parallel group.
    expert_params = layers * moe.mean_expert_params(cfg) / t
    stage_params = (layers * moe.mean_layer_params(cfg) + cfg.vocab_size * cfg.hidden) / t - expert_params + expert_params / ep
    dense_share = 1 - expert_params / ep / stage_params
    grad_bytes = sw.grad_reduce_bytes * stage_params
    gather_elem = 1 if (system.precision == "fp8" and sw.fp8_all_gather) else state_bytes(system.precision)[0]
    weight_bytes = gather_elem * stage_params
    aware = sw.hierarchical_dp
    shard_n = lay.dp_shard * c if lay.sharding in ("keep_gathered", "full") else n
    gathers = {"none": 0, "optimizer": 1, "keep_gathered": 1, "full": 2 * m}[lay.sharding]
    def data_parallel(share: float, group: int, near: int) -> tuple[float, float]:
        """(gradient reduce, weight gathers) of `share` of the rank's parameters over `group`."""
        if lay.sharding == "none" or shard_n <= 1:
            return r.hierarchical(share * grad_bytes, group, near, passes=2, topology_aware=aware), 0.0  # all-reduce
        red = r.hierarchical(share * grad_bytes, group, near, topology_aware=aware)  # reduce-scatter
        if n > shard_n:  # HSDP: the shards' gradients are all-reduced across the replicas
            red += r.hierarchical(share * grad_bytes / group, n // shard_n, 1, passes=2, topology_aware=aware)
        return red, gathers * r.hierarchical(share * weight_bytes, group, near, topology_aware=aware)

    group = n if lay.sharding == "none" or shard_n <= 1 else shard_n
    reduce, gather = data_parallel(dense_share, group, local)
    if dense_share < 1:  # experts: over the ranks left after ep, each ep * tp * cp apart
        more = data_parallel(1 - dense_share, max(1, group // ep), max(1, local // ep))
        reduce, gather = reduce + more[0], gather + more[1]
    if sw.overlap_dp:
        # Gradients are reduced in buckets while the last microbatch's backward (and the
        # pipeline drain) runs; weights are gathered ahead of the layer that needs them.
        reduce_window = bwd * layers + bubble / 2
        gather_window = (fwd + bwd) * layers * m if lay.sharding == "full" else fwd * layers
        exposed_reduce, exposed_gather = max(0.0, reduce - reduce_window), max(0.0, gather - gather_window)
        # Hidden is not free: the compute running beside the collectives is slowed
        # (`OVERLAP_SLOWDOWN`); a collective of T seconds under compute costs T * s / (1 + s).
        hidden = (reduce - exposed_reduce) + (gather - exposed_gather)
        slowed = OVERLAP_SLOWDOWN / (1 + OVERLAP_SLOWDOWN) * hidden
        exposed_reduce += slowed * (reduce - exposed_reduce) / hidden if hidden else 0.0
        exposed_gather += slowed * (gather - exposed_gather) / hidden if hidden else 0.0
    elif sw.overlap_zero3_reduce and lay.sharding == "full":  # DeepSpeed ZeRO-3's overlap_comm
        exposed_reduce, exposed_gather = max(0.0, reduce - (bwd * layers + bubble / 2)), gather
        exposed_reduce += OVERLAP_SLOWDOWN / (1 + OVERLAP_SLOWDOWN) * (reduce - exposed_reduce)
    else:
        exposed_reduce, exposed_gather = reduce, gather
    exposed_dp = exposed_reduce + exposed_gather

    # Optimizer step: memory-bound Adam over this rank's shard of the parameters.
    opt_params = (stage_params * dense_share / (shard_n if lay.sharding != "none" else 1)
                  + stage_params * (1 - dense_share) / (max(1, shard_n // ep) if lay.sharding != "none" else 1))
    optimizer = r.memory_pass(OPTIMIZER_BYTES_PER_PARAM * opt_params)

    step = pipeline + exposed_dp + optimizer
    exposed = m * (tp_comm + cp_comm + p2p + ep_comm + offload) + exposed_dp

    # The step, term by term (`plan --explain`): they add up to step_time_s.
    def tier(span: int) -> str:
        return "scale-up" if span <= r.gpus_per_node else "scale-out"

    dp_tier = "scale-up" if n * t <= r.gpus_per_node else ("scale-up + scale-out" if aware else "scale-out")
    reduce_name = "all-reduce" if lay.sharding == "none" or shard_n <= 1 else "reduce-scatter"
    terms = {
        "compute: linear GEMMs": m * layers * sum(classes["linear"]),
        "compute: attention": m * layers * sum(classes["attention"]),
        "compute: elementwise (norms, activations, residuals)": m * layers * sum(classes["elementwise"]),
        f"compute: recompute ({lay.recompute}{': ' + ' '.join(sw.recompute_modules) if lay.recompute == 'selective' and sw.recompute_modules else ''})": m * layers * rec,
        "compute: embedding": m * embedding if busiest == 0 else 0.0,
        "compute: output layer and loss": m * logits if busiest == p - 1 else 0.0,
        "comm: tp all-gather/reduce-scatter (scale-up), exposed": m * tp_comm,
        f"comm: cp all-gather K/V ({tier(t * c)})": m * cp_comm,
        f"comm: pp send/recv ({'scale-up' if t * c * lay.dp < r.gpus_per_node else 'scale-out'})": m * p2p,
        f"comm: ep all-to-all dispatch/combine ({a2a_tier})": m * ep_comm,
        "comm: activation offload to host memory, exposed": m * offload,
        "pipeline bubble": bubble,
        f"comm: dp gradient {reduce_name} ({dp_tier}), exposed": exposed_reduce,
        f"comm: dp weight all-gather ({dp_tier}), exposed": exposed_gather,
        "optimizer step": optimizer,
    }

    # FLOPs as the papers count them: model FLOPs (Korthikanti eq. 7, via flops_per_token);
    # hardware FLOPs add what recomputation repeats (a full recompute repeats each layer's
    # forward; the selective policy repeats only elementwise ops, which count no FLOPs).
    tokens = work.global_batch * s
    model_flops = flops_per_token(cfg, s) * tokens
    attention_fwd = attention_flops_per_token(cfg, s)
    layer_fwd = 2 * (matmul_params(cfg) - cfg.vocab_size * cfg.hidden) + attention_fwd  # no LM head
    extra = layer_fwd * tokens if lay.recompute == "full" else 0.0
    if lay.recompute == "selective" and sw.recompute_modules:
        extra = _module_recompute_flops_per_token(cfg, s, sw.recompute_modules) * tokens
    elif lay.recompute == "selective" and sw.selective == "attention":
        extra = attention_fwd * tokens  # Korthikanti eq. 8: the attention core's FLOPs again
    hardware_flops = model_flops + extra
    model_tflops = model_flops / step / gpus / 1e12
    hardware_tflops = hardware_flops / step / gpus / 1e12
    reserved = 0.0 if r.cpu else RESERVED_GIB
    return Estimate(
        layout=lay,
        stack=sw.name,
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
        terms=terms,
    )
