"""One decoder-only transformer, readable in one sitting.

Llama style by default (RMSNorm, RoPE, SwiGLU, grouped-query attention), GPT-2/3 style
when the config says so (LayerNorm with biases, learned positions, GELU). The layout
follows torchtitan so that parallelism composes from outside:

- `layers` is a ModuleDict keyed "0".."L-1": a pipeline stage deletes the blocks it does
  not own and every parameter keeps its fully qualified name, so checkpoints reshard.
- Attention infers its local head count from the tensor shapes, so tensor parallelism
  (which shards wq/wk/wv by columns) needs no change here.
- `tok_embeddings`, `norm` and `output` may be None (a middle pipeline stage).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from supercluster.errors import UserError
from supercluster.model.config import ModelConfig
from supercluster.model.moe import MoE


def rope_cache(cfg: ModelConfig, device=None) -> torch.Tensor:
    """cos and sin of every position and frequency: [max_seq_len, head_dim] as (cos | sin)."""
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_tables(rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos | cos) and (-sin | sin) of rope rows [s, d], shaped [s, 1, d]: made once a forward
    pass, so that each layer rotates in three kernels."""
    half = rope.shape[-1] // 2
    cos, sin = rope[..., None, :half], rope[..., None, half:]  # rows [b, s, d] (per-document positions) too
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (x[..., :half], x[..., half:]) of x [b, s, heads, d] by rope_tables' (cos, sin):
    (x1 cos - x2 sin, x2 cos + x1 sin), in fp32."""
    cos, sin = rope
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, swapped, sin).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)


class KVCache:
    """Keys and values of the tokens generated so far, per layer, for sampling."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def length(self) -> int:
        return next(iter(self.keys.values())).shape[1] if self.keys else 0


def fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output is the given layers' outputs side by side."""
    weight = torch.cat([m.weight.detach() for m in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias.detach() for m in linears]))
    return fused.requires_grad_(False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.head_dim, self.use_rope = layer, cfg.head_dim, cfg.position == "rope"
        q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.hidden, q, bias=cfg.bias)
        self.wk = nn.Linear(cfg.hidden, kv, bias=cfg.bias)
        self.wv = nn.Linear(cfg.hidden, kv, bias=cfg.bias)
        self.wo = nn.Linear(q, cfg.hidden, bias=cfg.bias)
        # Qwen3: RMSNorm over each head of q and k, before RoPE; OLMoE: over all of q's heads at once (and k's).
        self.qk_norm_per_head = cfg.qk_norm_per_head
        q_norm, k_norm = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm_per_head else (q, kv)
        self.q_norm = nn.RMSNorm(q_norm, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(k_norm, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.wqkv, self.qkv_heads = None, None  # set by fuse_projections, for serving
        # Context parallelism swaps this for an all-gather of keys and values over its group.
        self.sdpa = lambda q, k, v, is_causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
        )

    def fuse_projections(self) -> None:
        """One [q | k | v] matrix instead of three, for serving: a decode step multiplies a few rows
        by each matrix, so one call costs about what one of the three did. Training keeps the three
        (tensor parallelism shards them by name). q and k norms (Qwen3, OLMoE) apply to the
        product's q and k parts."""
        self.qkv_heads = [w.out_features // self.head_dim for w in (self.wq, self.wk, self.wv)]
        self.wqkv = fused_linear(self.wq, self.wk, self.wv)
        del self.wq, self.wk, self.wv

    def forward(self, x, rope, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        b, s, _ = x.shape
        if self.wqkv is not None and self.q_norm is None:
            heads, kv_heads, _ = self.qkv_heads
            qkv = self.wqkv(x).view(b, s, -1, self.head_dim)
            qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]
            if self.use_rope:  # queries and keys rotate in one call
                qk = apply_rope(qk, rope)
            q, k = qk[:, :, :heads], qk[:, :, heads:]
        else:
            if self.wqkv is not None:
                q, k, v = self.wqkv(x).split([n * self.head_dim for n in self.qkv_heads], dim=-1)
            else:
                q, k, v = self.wq(x), self.wk(x), self.wv(x)
            if self.q_norm is not None and not self.qk_norm_per_head:
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.view(b, s, -1, self.head_dim)  # -1: local heads under tensor parallelism
            k = k.view(b, s, -1, self.head_dim)
            v = v.view(b, s, -1, self.head_dim)
            if self.q_norm is not None and self.qk_norm_per_head:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.use_rope:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        if hasattr(cache, "attend"):  # a serving engine's paged cache: it stores k, v and attends
            return self.wo(cache.attend(self.layer, q, k, v).reshape(b, s, -1))
        # Prefill (or training) is causal; one decoded token attends to the whole cache. Asked of
        # this layer's own cache: during prefill the earlier layers' caches are already filled.
        causal = cache is None or self.layer not in cache.keys
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        if mask is not None:  # packed documents: causal within each, nothing across (see document_mask)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2])
            return self.wo(out.transpose(1, 2).reshape(b, s, -1))
        out = self.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=cfg.bias) if self.swiglu else None
        self.w13 = None  # set by fuse_projections, for serving

    def fuse_projections(self) -> None:
        """One [gate | up] matrix instead of two, for serving (see Attention.fuse_projections)."""
        if self.swiglu:
            self.w13 = fused_linear(self.w1, self.w3)
            del self.w1, self.w3

    def forward(self, x):
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm, self.attention = make_norm(cfg), Attention(cfg, layer)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = MoE(cfg) if cfg.moe_layer(layer) else FeedForward(cfg)

    def forward(self, x, rope, cache=None, mask=None):
        x = x + self.attention(self.attention_norm(x), rope, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.attention != "gqa":
            raise UserError(f"Attention {cfg.attention!r} (multi-head latent attention) is counted and planned but not "
                            f"built by this transformer yet; train or serve a model with attention \"gqa\".")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.hidden) if cfg.position == "learned" else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.layers)})
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_cache(cfg), persistent=False)
        self.init_weights()

    def fuse_projections(self) -> "Transformer":
        """Serving's layout: q, k, v in one matrix and gate and up in one (fewer, larger matmuls
        a step). Its parameters are no longer the checkpoint's, so only for inference."""
        for block in self.layers.values():
            block.attention.fuse_projections()
            block.feed_forward.fuse_projections()
        return self

    def init_weights(self, seed: int | None = None):
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L).

        Drawn on the CPU from `seed`, so every rank and every layout starts from the same
        weights; also fills the RoPE buffer, so a model built on the meta device works.
        """
        self.rope.copy_(rope_cache(self.cfg, self.rope.device))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norms and biases
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                residual = name.endswith(("wo.weight", "w2.weight", "experts.w2"))
                std = 0.02 / math.sqrt(2 * self.cfg.layers) if residual else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        for m in self.modules():
            if isinstance(m, MoE):
                m.reset_buffers()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_index: torch.Tensor | None = None, documents: torch.Tensor | None = None):
        """tokens [b, s] (or hidden states [b, s, h] in a later pipeline stage) -> logits or hidden.

        positions: absolute positions of the s tokens; default 0..s-1 (after any cached ones).
        logits_index: the token positions (along s) whose logits are wanted; a serving engine
        that packs many sequences' tokens needs only each one's last, not [s, vocab] of them.
        documents: [b, s] document ids of packed sequences (a change of id starts a document):
        positions restart at each document and attention stays inside it.
        """
        s = tokens.shape[1]
        mask = None
        if documents is not None:
            mask, doc_positions = document_mask(documents)
            positions = doc_positions if positions is None else positions
        if positions is None:
            start = cache.length() if cache is not None else 0
            positions = torch.arange(start, start + s, device=tokens.device)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(positions)
        rope = rope_tables(self.rope[positions])
        for block in self.layers.values():
            h = block(h, rope, cache, mask)
        if logits_index is not None:
            h = h[:, logits_index]
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def document_mask(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask [b, 1, s, s] (True: may attend) and positions [b, s] of packed documents.

    A document is a run of equal ids in a row; numbering the runs (rather than comparing the ids)
    keeps two documents apart even when they happen to carry the same id.
    """
    b, s = documents.shape
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    segment = starts.cumsum(dim=1)
    index = torch.arange(s, device=documents.device).expand(b, s)
    positions = index - torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    causal = torch.ones(s, s, dtype=torch.bool, device=documents.device).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    return mask[:, None], positions


def materialize(model: Transformer, device) -> Transformer:
    """Give a model built on the meta device real, uninitialised storage on `device`.

    `to_empty` gives every parameter storage of its own, which would silently untie a tied
    output head from the embedding; it is tied again here. The RoPE buffer is filled.
    """
    model.to_empty(device=device)
    if model.cfg.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        model.output.weight = model.tok_embeddings.weight
    model.rope.copy_(rope_cache(model.cfg, model.rope.device))
    return model


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = 0.95, generator: torch.Generator | None = None,
             stop: set[int] | frozenset = frozenset()) -> list[int]:
    """Sample a continuation of `prompt` with a KV cache: one prefill, then one token a step,
    ending early after a token in `stop` (a chat model's end of turn)."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    tokens = list(prompt[-limit:]) or [0]
    cache = KVCache()
    logits = model(torch.tensor([tokens], device=device), cache=cache)[0, -1]
    out = []
    for _ in range(max_new_tokens):
        if cache.length() >= limit:  # context full: restart the cache on the most recent tokens
            cache = KVCache()
            window = (tokens + out)[-(limit // 2):]
            logits = model(torch.tensor([window], device=device), cache=cache)[0, -1]
        next_id = sample_token(logits.float(), temperature, top_k, top_p, generator)
        out.append(next_id)
        if next_id in stop:
            break
        logits = model(torch.tensor([[next_id]], device=device), cache=cache)[0, -1]
    return out


def sample_token(logits, temperature, top_k, top_p, generator=None, min_p: float = 0.0) -> int:
    """One token from next-token `logits` [vocab]: the argmax at temperature 0, else drawn after
    temperature, top-k, min-p and top-p (in vLLM's order; the server's sampler shapes with this too)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return draw(probs, generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index drawn with probability proportional to `weights` (not negative, not all zero):
    where one uniform number falls in their running sum. `torch.multinomial` draws an
    exponential for every entry instead: 1.0 ms over SmolLM2's 49,152 tokens on a 2-core Xeon
    against 0.07 ms here (bench/serve_sampling.py), for each sampled token of each sequence,
    where a small model's whole step takes about 12 ms."""
    cdf = weights.double().cumsum(0)  # float64: a long vocabulary's sum keeps its small entries
    u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device if generator is not None else "cpu")
    x = u.to(cdf.device) * cdf[-1]  # a seeded request's generator lives on the CPU, whatever the model's device
    # The first entry whose running sum exceeds x: never one of weight 0 (its sum equals the one
    # before it). Past the end only when x rounds up to the total.
    index = int(torch.searchsorted(cdf, x, right=True))
    return index if index < len(cdf) else int(torch.nonzero(weights)[-1])
