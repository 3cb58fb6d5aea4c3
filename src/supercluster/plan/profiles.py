"""Software profiles: what a training stack does, as opposed to what the layout is.

A profile is a handful of documented physical switches (which kernels fuse, which
collectives overlap compute, what precision gradients are reduced in, which sharding
strategies the stack runs) plus at most two constants fitted against that stack's published
runs (`plan.calibrate` writes them to constants.json, per profile). The same profile applies
to every row of its stack: nothing is switched for particular runs.

- supercluster: this trainer, PyTorch-native like torchtitan: FSDP2 (fully_shard), DTensor
  tensor parallelism, torch.distributed.pipelining, flash attention through SDPA; torch.compile
  is the user's choice (train.compile), eager otherwise. TP collectives are not overlapped
  (unless --async-tp); in FP8 with tensorwise scaling its TP all-gathers move FP8, as
  torchtitan's Float8 tensor parallelism does.
- megatron: Megatron-LM / NeMo / Megatron-Bridge with Transformer Engine: hand-fused kernels, TP
  communication overlap, overlapped gradient reduce and parameter gather, distributed optimizer
  (ZeRO-1) or Megatron-FSDP (full sharding, Megatron-Core 0.14+).
- megatron-2021: the same stack as published in 2021-22 (Narayanan et al. 2021, Korthikanti
  et al. 2022): fused bias/GELU/softmax kernels but attention unfused (scores stored, softmax
  read and written), gradients all-reduced in 16 bits after the backward pass (no overlap).
- deepspeed: DeepSpeed ZeRO stages 0-3; 16-bit gradient reduction, collectives across nodes
  that each GPU drives through its own NIC (no hierarchical rings); only ZeRO-3's gradient
  reduce-scatter overlaps compute (overlap_comm's default), weight gathers run in line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from supercluster.errors import UserError, closest


@dataclass(frozen=True)
class Software:
    name: str = "supercluster"
    flash_attention: bool = True  # attention scores never stored (Dao et al. 2022)
    # Elementwise ops (norms, activation, rotary, residual) fused into few kernels: by hand in
    # Megatron/TE and DeepSpeed, by torch.compile here. Eager PyTorch runs each op as its own
    # kernel, reading and writing its tensors again.
    fused_elementwise: bool = True
    overlap_dp: bool = True  # gradient reduce / weight gather overlap backward / forward
    # Without overlap_dp: the gradient reduce-scatter still runs under the backward when the
    # weights are fully sharded (DeepSpeed's overlap_comm, on by default for ZeRO-3 only:
    # DeepSpeedZeroConfig.overlap_comm_valid sets it to stage == 3); the weight gathers stay
    # in line (ZeRO-3 prefetches stage3_prefetch_bucket_size = 5e7 elements ahead, a few % of
    # a GPT-3 layer's 1.8e9).
    overlap_zero3_reduce: bool = False
    overlap_tp: bool = False  # TP collectives chunked under the GEMMs (TE tp-comm-overlap, AsyncTP)
    grad_reduce_bytes: int = 4  # fp32 gradient reduction (2: 16-bit, as DeepSpeed and 2021 Megatron)
    # Data-parallel collectives use NVLink inside a node and every NIC across nodes (NCCL
    # rings/trees); False: each GPU's collectives run at its one NIC's rate.
    hierarchical_dp: bool = True
    fp8_all_gather: bool = False  # FSDP weight all-gathers in FP8 when training in FP8
    # Sequence-parallel TP all-gathers in FP8 under tensorwise FP8 scaling: torchao's
    # Float8ColwiseParallel / Float8RowwiseParallel / PrepareFloat8ModuleInput
    # (torchao/float8/float8_tensor_parallel.py) cast a column-parallel layer's input to FP8
    # *before* its all-gather, and the gradient arriving at a row-parallel layer's output to
    # FP8 before the backward all-gather; the reduce-scatters stay 16-bit (they sum GEMM
    # outputs). torchtitan uses them whenever Float8 linears meet TP with a tensorwise recipe
    # (`enable_float8_tensorwise_tp` in its parallelize_llama: "For rowwise recipes, we use
    # regular TP and all-gather happens in high precision").
    fp8_tp_all_gather: bool = False
    # How FP8 GEMM operands are scaled (torchao Float8 recipes; Transformer Engine's MXFP8 on
    # Blackwell): one scale per tensor, one per row, or one per 32-element block.
    fp8_recipe: str = "tensorwise"
    # FP8 casts fused into the kernels producing the activations, weights cast once per step
    # (Transformer Engine); False: each GEMM casts both operands in their own kernels (torchao).
    fp8_cast_fused: bool = False
    # What "selective" recompute drops and rebuilds: "elementwise" (this trainer: norm and
    # activation outputs) or "attention" (Megatron's: the attention core, scores and softmax,
    # Korthikanti et al. 2022 sec. 5).
    selective: str = "elementwise"
    # Megatron-Core's module-level selective recompute (--recompute-granularity selective
    # --recompute-modules ...; megatron/core/transformer/transformer_config.py
    # `recompute_modules`): with the layout's recompute "selective", each named module's
    # forward runs again in the backward and its saved activations are not kept, instead of the
    # `selective` policy above. () = the profile's policy (Megatron's default is core_attn,
    # which is that policy). See `RECOMPUTE_MODULES`.
    recompute_modules: tuple[str, ...] = ()
    # Gathered weights live during a ZeRO-3 step: None = two layers (FSDP2 prefetches the next
    # layer's unit while one computes), else DeepSpeed's stage3_max_live_parameters cap.
    max_live_params: float | None = None
    # Gradients of all microbatches accumulate unsharded before one reduce-scatter (FSDP2
    # under torch.distributed.pipelining: no gradient sync until the last backward).
    accumulate_unsharded_grads: bool = False
    # Pipeline stages may hold only the embedding or only the loss (Megatron-Core's
    # account_for_embedding/loss_in_pipeline_split): up to layers + 2 stages.
    embedding_stages: bool = False
    # Expert parallelism composed with tensor and context parallelism (Megatron-Core's expert
    # tensor parallelism and folding); this trainer runs ep with tp 1 and cp 1 only.
    expert_tp_cp: bool = False
    # Expert-parallel all-to-alls overlapped with another microbatch's compute (DeepSeek-V3's
    # DualPipe, sec. 3.2.1; Megatron-Core's overlap_moe_expert_parallel_comm).
    overlap_ep: bool = False
    # Dispatch that sends a token once to each remote node its experts are on and fans it out
    # over NVLink there (combine: reduced in the node first): DeepSeek-V3 sec. 3.2.2, DeepEP,
    # Megatron-Core's flex dispatcher. False: one copy per chosen expert (NCCL all-to-all).
    ep_node_dedup: bool = False
    # Dispatch in FP8 (1 byte per element plus a scale per 128), combine in 16 bits:
    # DeepSeek-V3 sec. 3.3.2 ("we quantize the activation before MoE up-projections into FP8
    # and then apply dispatch components"; combine stays BF16).
    fp8_dispatch: bool = False
    # Activations of this many layers per pipeline rank copied to host memory after their
    # forward and back before their backward, on a side stream under the other layers' compute
    # (Megatron-Core's cpu_offloading_num_layers, activations only): HBM for bandwidth to the
    # host (`catalog.NodeType.host_link_gbps`). 0: none.
    offload_layers: int = 0
    # Context parallelism by PyTorch's experimental ring attention
    # (torch.distributed.tensor.experimental.context_parallel, which torchtitan wraps), with K
    # and V repeated to every query head before SDPA (torchtitan's Llama at 9dec370:
    # `repeat_kv` then `F.scaled_dot_product_attention`): each ring step's partial output is
    # merged, and dQ, dK, dV accumulated, in fp32 passes over HBM (`cost.torch_ring_bytes`).
    # False: this trainer's all-gather of the grouped K and V (`parallel.context`).
    torch_ring_cp: bool = False
    shardings: tuple[str, ...] = ("none", "keep_gathered", "full")  # strategies the stack runs
    fitted: tuple[str, ...] = ("gemm_efficiency", "fp8_efficiency")  # calibrated per profile (at most two)


PROFILES: dict[str, Software] = {
    "supercluster": Software(accumulate_unsharded_grads=True, fp8_tp_all_gather=True),
    "megatron": Software(
        name="megatron", overlap_tp=True, shardings=("none", "optimizer", "full"), selective="attention",
        fp8_cast_fused=True, embedding_stages=True, expert_tp_cp=True,
    ),
    "megatron-2021": Software(
        name="megatron-2021", flash_attention=False, overlap_dp=False, grad_reduce_bytes=2, shardings=("none",),
        selective="attention",
    ),
    "deepspeed": Software(
        name="deepspeed", flash_attention=False, overlap_dp=False, grad_reduce_bytes=2, hierarchical_dp=False,
        shardings=("none", "optimizer", "keep_gathered", "full"), max_live_params=1e9, overlap_zero3_reduce=True,
    ),
}
DEFAULT = "supercluster"
FP8_RECIPES = ("tensorwise", "delayed", "rowwise", "mxfp8")
# Megatron-Core's recompute_modules (transformer_config.py; --recompute-modules in
# megatron/training/arguments.py): "core_attn" the attention core; "moe_act" the MoE experts'
# activation function; "layernorm" input_layernorm and pre_mlp_layernorm; "mla_up_proj" the
# MLA up projections and RoPE; "mlp" the dense MLP submodule (dense layers only); "moe" the
# MoE layer; "shared_experts" the MoE layer's shared experts.
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")


def with_switches(sw: Software, compile: bool | None = None, async_tp: bool | None = None,
                  fp8_recipe: str | None = None, fp8_all_gather: bool | None = None,
                  ep_overlap: bool | None = None, ep_node_dedup: bool | None = None,
                  fp8_dispatch: bool | None = None, offload_layers: int | None = None,
                  grad_reduce_bytes: int | None = None, recompute_modules: tuple[str, ...] | None = None,
                  torch_ring_cp: bool | None = None) -> Software:
    """A profile with the run's own switches on top (None keeps the profile's):

    - compile: torch.compile fuses the elementwise ops (norms, activation, rotary, residual)
      into few kernels; eager PyTorch reads and writes each op's tensors again. torchtitan's
      H100 benchmark shows the difference (Llama 3.1 8B, 5,762 -> 6,667 tokens/s/GPU).
    - async_tp: tensor-parallel all-gathers and reduce-scatters decomposed into chunks that
      run under the GEMMs consuming or producing them (PyTorch's AsyncTP, "Introducing Async
      Tensor Parallelism in PyTorch", 2024; Wang et al., ASPLOS'23), Megatron's TP overlap.
    - fp8_recipe: how FP8 operands are scaled (torchao Float8Linear's tensorwise and rowwise;
      Transformer Engine's delayed scaling; MXFP8 block scaling on Blackwell): what each cast
      reads and writes (`cost.Rates`).
    - fp8_all_gather: FSDP all-gathers the weights already cast to FP8 (torchao's
      enable_fsdp_float8_all_gather): half the bytes of a 16-bit gather.
    - ep_overlap: MoE dispatch and combine run under another microbatch's compute (DualPipe).
    - ep_node_dedup: a token crosses the scale-out network once per node its experts sit on,
      then fans out over NVLink (DeepSeek-V3 sec. 3.2.2; DeepEP's internode kernels).
    - fp8_dispatch: the dispatch all-to-all moves FP8 activations (DeepSeek-V3 sec. 3.3.2).
    - offload_layers: that many layers' activations per pipeline rank live in host memory
      between their forward and backward (Megatron-Core's cpu_offloading_num_layers; the
      Megatron-Bridge GB200 recipes for Llama 3 70B with Megatron-FSDP offload 40 of 80 layers
      and run no recompute): less HBM, plus whatever of the copies the compute cannot hide.
    - grad_reduce_bytes: the gradient reduction's element size, 2 where the run reduces in
      16 bits (FSDP's MixedPrecision(reduce_dtype=torch.bfloat16), as IBM's fms-fsdp does),
      4 for fp32 reduction.
    - recompute_modules: Megatron-Core's --recompute-modules, what "selective" recompute
      rebuilds (`RECOMPUTE_MODULES`); the Megatron-Bridge DeepSeek-V3 performance recipes set
      mla_up_proj (B200, GB200) or mla_up_proj and mlp (H100).
    - torch_ring_cp: context parallelism through PyTorch's experimental ring attention with K/V
      repeated to every head (torchtitan's context_parallel runs, `Software.torch_ring_cp`).
    """
    changes = {}
    if compile is not None:
        changes["fused_elementwise"] = compile
    if async_tp is not None:
        changes["overlap_tp"] = async_tp
    if fp8_recipe is not None:
        if fp8_recipe not in FP8_RECIPES:
            raise UserError(f"--fp8-recipe must be one of {', '.join(FP8_RECIPES)}, got {fp8_recipe!r}"
                            f"{closest(fp8_recipe, FP8_RECIPES)}.")
        changes["fp8_recipe"] = fp8_recipe
    if fp8_all_gather is not None:
        changes["fp8_all_gather"] = fp8_all_gather
    if ep_overlap is not None:
        changes["overlap_ep"] = ep_overlap
    if ep_node_dedup is not None:
        changes["ep_node_dedup"] = ep_node_dedup
    if fp8_dispatch is not None:
        changes["fp8_dispatch"] = fp8_dispatch
    if grad_reduce_bytes is not None:
        if grad_reduce_bytes not in (2, 4):
            raise UserError(f"gradient reduction must be 2 or 4 bytes an element, got {grad_reduce_bytes}.")
        changes["grad_reduce_bytes"] = grad_reduce_bytes
    if offload_layers is not None:
        if offload_layers < 0:
            raise UserError(f"--cpu-offload-layers must be 0 or more, got {offload_layers}.")
        changes["offload_layers"] = offload_layers
    if torch_ring_cp is not None:
        changes["torch_ring_cp"] = torch_ring_cp
    if recompute_modules is not None:
        bad = [mod for mod in recompute_modules if mod not in RECOMPUTE_MODULES]
        if bad:
            raise UserError(f"--recompute-modules takes {', '.join(RECOMPUTE_MODULES)}, got {bad[0]!r}"
                            f"{closest(bad[0], RECOMPUTE_MODULES)}.")
        changes["recompute_modules"] = tuple(recompute_modules)
    return replace(sw, **changes) if changes else sw


def profile(name: str | None = None) -> Software:
    """The profile called `name` (default: this trainer's)."""
    name = (name or DEFAULT).lower()
    if name not in PROFILES:
        raise UserError(f"Unknown stack {name!r}{closest(name, PROFILES)}; choose one of {', '.join(PROFILES)}.")
    return PROFILES[name]
