"""Model shapes, named presets, and their parameter and FLOP counts.

Torch-free on purpose: the planner imports this to size models it will never build.
One decoder-only family covers both lineages: GPT-2/3 (LayerNorm with biases, learned
positions, GELU MLP, tied embeddings) and Llama (RMSNorm, RoPE, SwiGLU, grouped-query
attention, untied head).
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
    preset: str | None = None  # the name this config started from, for display only

    def __post_init__(self):
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.ffn_hidden is None:
            if self.mlp == "gelu":
                self.ffn_hidden = 4 * self.hidden
            else:  # Llama: 2/3 of 4h, rounded up to a multiple of 256
                self.ffn_hidden = 256 * ((int(8 * self.hidden / 3) + 255) // 256)

    def validate(self) -> "ModelConfig":
        for name, limit in SIZE_LIMITS.items():
            if not 0 < getattr(self, name) <= limit:
                raise UserError(f"model.{name} must be in 1..{limit:,}, got {getattr(self, name):,}.")
        for name in ("rope_theta", "norm_eps"):
            if not 0 < getattr(self, name) < float("inf"):
                raise UserError(f"model.{name} must be a positive number, got {getattr(self, name)}.")
        if self.hidden % self.heads:
            raise UserError(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads}).")
        if self.heads % self.kv_heads:
            raise UserError(f"model.heads ({self.heads}) must be divisible by model.kv_heads ({self.kv_heads}).")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head size; hidden/heads is {self.head_dim}.")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}.")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Far above any model built (Llama 3 405B: 126 layers, hidden 16,384, ffn 53,248, vocab 128,256),
# below the sizes whose tensors could not be allocated at all.
SIZE_LIMITS = {"layers": 10_000, "hidden": 262_144, "heads": 16_384, "kv_heads": 16_384, "ffn_hidden": 1_048_576,
               "vocab_size": 16_777_216, "max_seq_len": 16_777_216}

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")

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


def layer_params(cfg: ModelConfig) -> int:
    """Parameters in one transformer block."""
    h, kv = cfg.hidden, cfg.kv_heads * cfg.head_dim
    attn = h * h + 2 * h * kv + h * h  # q, k, v, out
    n_mlp = 3 if cfg.mlp == "swiglu" else 2
    mlp = n_mlp * h * cfg.ffn_hidden
    norm = 2 * h * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    bias = (h + 2 * kv + h + (n_mlp - 1) * cfg.ffn_hidden + h) if cfg.bias else 0
    return attn + mlp + norm + bias


def num_params(cfg: ModelConfig) -> int:
    """Total trainable parameters, counting a tied embedding once."""
    embed = cfg.vocab_size * cfg.hidden
    positions = cfg.max_seq_len * cfg.hidden if cfg.position == "learned" else 0
    final_norm = cfg.hidden * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden
    return embed + positions + cfg.layers * layer_params(cfg) + final_norm + head


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every block's linears and the LM head.

    The input embedding is a table lookup, norms and biases are elementwise; Megatron's and
    PaLM's FLOP formulas leave them out as well.
    """
    h, kv = cfg.hidden, cfg.kv_heads * cfg.head_dim
    n_mlp = 3 if cfg.mlp == "swiglu" else 2
    per_layer = 2 * h * h + 2 * h * kv + n_mlp * h * cfg.ffn_hidden
    return cfg.layers * per_layer + cfg.vocab_size * h


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the score and value matmuls (QK^T and AV) for one token.

    Counted over the full s×s square, the convention of Megatron-LM (Narayanan et al.
    2021, eq. 3) and PaLM (Chowdhery et al. 2022, App. B) that published MFU figures use,
    although causal kernels skip about half of it.
    """
    return 2 * 2 * cfg.layers * seq_len * cfg.hidden


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul weight forward, 3× that with the backward pass."""
    forward = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
    return 3 * forward if training else forward
