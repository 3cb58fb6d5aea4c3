"""Model shapes, named presets, and their parameter and FLOP counts.

Torch-free on purpose: the planner imports this to size models it will never build.
One decoder-only family covers both lineages: GPT-2/3 (LayerNorm with biases, learned
positions, GELU MLP, tied embeddings) and Llama (RMSNorm, RoPE, SwiGLU, grouped-query
attention, untied head), with a Mixture-of-Experts feed-forward in any layer after the
first `moe_dense_layers` (Mixtral, Qwen3-MoE, DeepSeek-V3).

Counts come in two kinds for MoE models: total (every expert, what memory holds) and
active (the experts one token passes through, what FLOPs follow).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from supercluster.errors import UserError, closest


@dataclass
class ModelConfig:
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int | None = None  # None: same as heads (multi-head attention)
    ffn_hidden: int | None = None  # None: 4*hidden (gelu) or Llama's 8/3*hidden rounded (swiglu)
    vocab_size: int = 4096
    max_seq_len: int = 256
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu | gelu
    position: str = "rope"  # rope | learned
    bias: bool = False  # biases in linear layers and norms (GPT-2/3 style)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int | None = None  # None: hidden / heads (Qwen3 sets its own, wider than that)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    # Attention kind: "gqa" (multi-head or grouped-query) or "mla" (DeepSeek's multi-head latent
    # attention: counted exactly here, not built by the transformer this round).
    attention: str = "gqa"
    q_lora_rank: int = 0  # MLA: rank of the query's low-rank projection (0: a full wq)
    kv_lora_rank: int = 0  # MLA: rank of the shared key-value latent
    rope_head_dim: int = 0  # MLA: the rotated part of each query and key head, beside head_dim
    v_head_dim: int | None = None  # MLA: value head size; None: head_dim
    # Mixture of Experts: 0 experts is a dense model.
    moe_experts: int = 0  # routed experts per MoE layer
    moe_top_k: int = 2  # experts each token is sent to
    moe_shared_experts: int = 0  # experts every token passes through as well (DeepSeek)
    moe_hidden: int | None = None  # one expert's FFN width; None: ffn_hidden
    moe_dense_layers: int = 0  # the first N layers keep a dense FFN (DeepSeek-V3: 3)
    moe_router: str = "softmax"  # softmax | sigmoid (DeepSeek-V3) scores, computed in fp32
    moe_norm_topk: bool = True  # renormalise the chosen experts' scores to sum to 1
    moe_route_scale: float = 1.0  # scale of the routed experts' output (DeepSeek-V3: 2.5)
    moe_groups: int = 1  # group-limited routing: experts in this many groups...
    moe_topk_groups: int = 1  # ...and each token's experts come from its best this-many groups
    moe_aux_loss_coef: float = 0.0  # the load-balancing auxiliary loss (Switch/Mixtral style); 0: off
    moe_bias_update_rate: float = 0.0  # auxiliary-loss-free balancing (DeepSeek-V3); 0: off
    preset: str | None = None  # the name this config started from, for display only

    def __post_init__(self):
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.head_dim is None and self.heads and self.hidden % self.heads == 0:
            self.head_dim = self.hidden // self.heads
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.ffn_hidden is None:
            if self.mlp == "gelu":
                self.ffn_hidden = 4 * self.hidden
            else:  # Llama: 2/3 of 4h, rounded up to a multiple of 256
                self.ffn_hidden = 256 * ((int(8 * self.hidden / 3) + 255) // 256)
        if self.moe_hidden is None:
            self.moe_hidden = self.ffn_hidden

    def validate(self) -> "ModelConfig":
        for name, limit in SIZE_LIMITS.items():
            if not 0 < getattr(self, name) <= limit:
                raise UserError(f"model.{name} must be in 1..{limit:,}, got {getattr(self, name):,}.")
        for name in ("rope_theta", "norm_eps"):
            if not 0 < getattr(self, name) < float("inf"):
                raise UserError(f"model.{name} must be a positive number, got {getattr(self, name)}.")
        if self.head_dim is None:
            raise UserError(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads}), "
                            f"or model.head_dim set.")
        if not 0 < self.head_dim <= 65_536:
            raise UserError(f"model.head_dim must be in 1..65,536, got {self.head_dim:,}.")
        if self.heads % self.kv_heads:
            raise UserError(f"model.heads ({self.heads}) must be divisible by model.kv_heads ({self.kv_heads}).")
        rotated = self.rope_head_dim if self.attention == "mla" else self.head_dim
        if self.position == "rope" and rotated % 2:
            raise UserError(f"RoPE needs an even head size; the rotated head size is {rotated}.")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS), ("attention", ATTENTIONS),
                              ("moe_router", ROUTERS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}.")
        if self.moe_experts:
            self._validate_moe()
        return self

    def _validate_moe(self) -> None:
        for name in ("moe_experts", "moe_top_k", "moe_hidden", "moe_groups", "moe_topk_groups"):
            if not 0 < getattr(self, name) <= 1_048_576:
                raise UserError(f"model.{name} must be in 1..1,048,576, got {getattr(self, name):,}.")
        for name in ("moe_shared_experts", "moe_dense_layers"):
            if getattr(self, name) < 0:
                raise UserError(f"model.{name} must be 0 or more, got {getattr(self, name)}.")
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate", "moe_route_scale"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise UserError(f"model.{name} must be a number of 0 or more, got {getattr(self, name)}.")
        if self.moe_top_k > self.moe_experts:
            raise UserError(f"model.moe_top_k ({self.moe_top_k}) is larger than the {self.moe_experts} experts; "
                            f"a token can be sent to at most every expert.")
        if self.moe_experts % self.moe_groups:
            raise UserError(f"model.moe_groups ({self.moe_groups}) must divide model.moe_experts ({self.moe_experts}).")
        if self.moe_topk_groups > self.moe_groups:
            raise UserError(f"model.moe_topk_groups ({self.moe_topk_groups}) is larger than model.moe_groups "
                            f"({self.moe_groups}).")
        if self.moe_top_k > self.moe_topk_groups * (self.moe_experts // self.moe_groups):
            raise UserError(f"model.moe_top_k ({self.moe_top_k}) is more than the experts in the "
                            f"{self.moe_topk_groups} groups a token may use.")
        if self.mlp != "swiglu":
            raise UserError("Mixture-of-Experts layers use SwiGLU experts; set model.mlp to swiglu.")

    @property
    def is_moe(self) -> bool:
        return self.moe_experts > 0

    def moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has the Mixture-of-Experts feed-forward (else a dense one)."""
        return self.moe_experts > 0 and layer >= self.moe_dense_layers

    @property
    def moe_layers(self) -> int:
        return sum(self.moe_layer(i) for i in range(self.layers))


# Far above any model built (Llama 3 405B: 126 layers, hidden 16,384, ffn 53,248, vocab 128,256),
# below the sizes whose tensors could not be allocated at all.
SIZE_LIMITS = {"layers": 10_000, "hidden": 262_144, "heads": 16_384, "kv_heads": 16_384, "ffn_hidden": 1_048_576,
               "vocab_size": 16_777_216, "max_seq_len": 16_777_216}

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")
ATTENTIONS = ("gqa", "mla")
ROUTERS = ("softmax", "sigmoid")

_GPT = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True)
_LLAMA3 = dict(vocab_size=128256, max_seq_len=8192, rope_theta=500000.0)

# Shapes as published: GPT-2 (Radford et al. 2019, the released checkpoints), GPT-3
# (Brown et al. 2020, Table 2.1), Llama 3 (Dubey et al. 2024, Table 3).
PRESETS: dict[str, dict] = {
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab_size=512, max_seq_len=128),
    # small: sized for the demo, about 2 minutes on 2 CPU cores (near compute-optimal there)
    "small": dict(layers=4, hidden=128, heads=4, kv_heads=2, ffn_hidden=384, vocab_size=2048, max_seq_len=256),
    "gpt2-124m": dict(layers=12, hidden=768, heads=12, vocab_size=50257, max_seq_len=1024, **_GPT),
    "gpt2-1.5b": dict(layers=48, hidden=1600, heads=25, vocab_size=50257, max_seq_len=1024, **_GPT),
    "gpt3-175b": dict(layers=96, hidden=12288, heads=96, vocab_size=50257, max_seq_len=2048, **_GPT),
    "llama3-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, **_LLAMA3),
    "llama3-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, **_LLAMA3),
    "llama3-405b": dict(layers=126, hidden=16384, heads=128, kv_heads=8, ffn_hidden=53248, **_LLAMA3),
    # Llama 3.2 1B's blocks (Meta's model card) with a 32,000-token vocabulary (Llama 2's size),
    # which the uint16 token shards hold: 1.04B parameters, the one-GPU check's model.
    "llama-1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192, vocab_size=32000, max_seq_len=8192,
                     rope_theta=500000.0, tie_embeddings=True),
    # Mixture of Experts. tiny-moe: for tests, 4 experts of top-2 with one shared, layer 0 dense.
    "tiny-moe": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab_size=512, max_seq_len=128,
                     moe_experts=4, moe_top_k=2, moe_hidden=64, moe_shared_experts=1, moe_dense_layers=1,
                     moe_aux_loss_coef=0.01),
    # Mixtral 8x7B (Jiang et al. 2024; its Hugging Face config): 46,702,792,704 parameters, 12.88B active.
    "mixtral-8x7b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab_size=32000,
                         max_seq_len=32768, rope_theta=1e6, moe_experts=8, moe_top_k=2),
    # Qwen3-30B-A3B (Qwen3 technical report; its Hugging Face config): 128 experts, top-8, head_dim 128
    # with qk-norm: 30.53B parameters, 3.35B active.
    "qwen3-30b-a3b": dict(layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, qk_norm=True, ffn_hidden=6144,
                          vocab_size=151936, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, moe_experts=128,
                          moe_top_k=8, moe_hidden=768),
    # DeepSeek-V3 (DeepSeek-AI 2024, Table/config.json): 61 layers, the first 3 dense, 256 routed experts
    # (top-8 from the best 4 of 8 groups, sigmoid scores, aux-loss-free bias) and 1 shared; 671.0B
    # parameters, 37.55B active (the multi-token-prediction module's 14B not counted, as the paper).
    # Multi-head latent attention is counted exactly, but the transformer refuses to build it this
    # round and the planner costs it from these counts.
    "deepseek-v3": dict(layers=61, hidden=7168, heads=128, kv_heads=128, head_dim=128, attention="mla",
                        q_lora_rank=1536, kv_lora_rank=512, rope_head_dim=64, v_head_dim=128, ffn_hidden=18432,
                        vocab_size=129280, max_seq_len=163840, rope_theta=10000.0, norm_eps=1e-6,
                        moe_experts=256, moe_top_k=8, moe_hidden=2048, moe_shared_experts=1, moe_dense_layers=3,
                        moe_router="sigmoid", moe_route_scale=2.5, moe_groups=8, moe_topk_groups=4,
                        moe_bias_update_rate=0.001),
}

# What each preset is, in one line (shown by `supercluster plan` and the model listing).
DESCRIPTIONS = {
    "deepseek-v3": "DeepSeek-V3 671B (37.6B active); multi-head latent attention is costed from exact counts, "
                   "the transformer refuses to build it this round",
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with any field overridden (None values are ignored)."""
    if name not in PRESETS:
        raise UserError(f"Unknown model preset {name!r}{closest(name, PRESETS)}; choose one of {', '.join(PRESETS)}.")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"Unknown model field {key!r}{closest(key, [f.name for f in dataclasses.fields(ModelConfig)])}.")
    return ModelConfig(**fields, preset=name).validate()


# ---- counts ---------------------------------------------------------------------------


def attention_params(cfg: ModelConfig) -> int:
    """Parameters of one attention block (projections, their biases, q/k norms)."""
    h, d = cfg.hidden, cfg.head_dim
    if cfg.attention == "mla":
        qk = d + cfg.rope_head_dim
        q = (h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * cfg.heads * qk) if cfg.q_lora_rank \
            else h * cfg.heads * qk
        kv = h * (cfg.kv_lora_rank + cfg.rope_head_dim) + cfg.kv_lora_rank \
            + cfg.kv_lora_rank * cfg.heads * (d + cfg.v_head_dim)
        return q + kv + cfg.heads * cfg.v_head_dim * h
    q, kv = cfg.heads * d, cfg.kv_heads * d
    weights = h * q + 2 * h * kv + q * h
    bias = (q + 2 * kv + h) if cfg.bias else 0
    return weights + bias + (2 * d if cfg.qk_norm else 0)


def _dense_ffn_params(cfg: ModelConfig, width: int) -> int:
    n_mlp = 3 if cfg.mlp == "swiglu" else 2
    return n_mlp * cfg.hidden * width + (((n_mlp - 1) * width + cfg.hidden) if cfg.bias else 0)


def ffn_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """Feed-forward parameters of block `layer`: dense, or router + experts (all, or one token's)."""
    if not cfg.moe_layer(layer):
        return _dense_ffn_params(cfg, cfg.ffn_hidden)
    experts = (cfg.moe_top_k if active else cfg.moe_experts) + cfg.moe_shared_experts
    return cfg.hidden * cfg.moe_experts + experts * 3 * cfg.hidden * cfg.moe_hidden


def layer_params(cfg: ModelConfig, layer: int | None = None, active: bool = False) -> float:
    """Parameters in transformer block `layer` (all experts, or `active`: a token's).

    layer None: the mean over the model's blocks (every block, for a dense model), so that
    `layers * layer_params(cfg)` is the blocks' total."""
    if layer is None:
        if not cfg.is_moe:
            return layer_params(cfg, 0)
        return sum(layer_params(cfg, i, active) for i in range(cfg.layers)) / cfg.layers
    norm = 2 * cfg.hidden * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    return attention_params(cfg) + ffn_params(cfg, layer, active) + norm


def _blocks(cfg: ModelConfig, active: bool) -> int:
    if not cfg.is_moe:
        return cfg.layers * layer_params(cfg, 0)
    dense, moe = cfg.layers - cfg.moe_layers, cfg.moe_layers
    first_moe = cfg.layers - moe
    return dense * (layer_params(cfg, 0) if dense else 0) + moe * layer_params(cfg, first_moe, active)


def num_params(cfg: ModelConfig, active: bool = False) -> int:
    """Total trainable parameters, counting a tied embedding once; `active`: those one token
    uses (its top-k and shared experts, not the others)."""
    embed = cfg.vocab_size * cfg.hidden
    positions = cfg.max_seq_len * cfg.hidden if cfg.position == "learned" else 0
    final_norm = cfg.hidden * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden
    return embed + positions + _blocks(cfg, active) + final_norm + head


def active_params(cfg: ModelConfig) -> int:
    return num_params(cfg, active=True)


def _attention_matmul_params(cfg: ModelConfig) -> int:
    """Attention weights that multiply each token (norms and biases left out)."""
    if cfg.attention == "mla":
        h, d, qk = cfg.hidden, cfg.head_dim, cfg.head_dim + cfg.rope_head_dim
        q = (h * cfg.q_lora_rank + cfg.q_lora_rank * cfg.heads * qk) if cfg.q_lora_rank else h * cfg.heads * qk
        return q + h * (cfg.kv_lora_rank + cfg.rope_head_dim) + cfg.kv_lora_rank * cfg.heads * (d + cfg.v_head_dim) \
            + cfg.heads * cfg.v_head_dim * h
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return 2 * cfg.hidden * q + 2 * cfg.hidden * kv


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every block's linears (a MoE block's router
    and the experts the token is sent to) and the LM head.

    The input embedding is a table lookup, norms and biases are elementwise; Megatron's and
    PaLM's FLOP formulas leave them out as well.
    """
    n_mlp = 3 if cfg.mlp == "swiglu" else 2
    attn = _attention_matmul_params(cfg)
    total = 0
    for i in range(cfg.layers) if cfg.is_moe else [0] * cfg.layers:
        if cfg.moe_layer(i):
            total += attn + cfg.hidden * cfg.moe_experts \
                + (cfg.moe_top_k + cfg.moe_shared_experts) * 3 * cfg.hidden * cfg.moe_hidden
        else:
            total += attn + n_mlp * cfg.hidden * cfg.ffn_hidden
    return total + cfg.vocab_size * cfg.hidden


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the score and value matmuls (QK^T and AV) for one token.

    Counted over the full s×s square, the convention of Megatron-LM (Narayanan et al.
    2021, eq. 3) and PaLM (Chowdhery et al. 2022, App. B) that published MFU figures use,
    although causal kernels skip about half of it. (4·s·hidden for multi-head attention.)
    """
    qk = cfg.head_dim + (cfg.rope_head_dim if cfg.attention == "mla" else 0)
    return 2 * cfg.layers * seq_len * cfg.heads * (qk + cfg.v_head_dim)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul weight forward (active experts only), 3× that with
    the backward pass."""
    forward = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
    return 3 * forward if training else forward
