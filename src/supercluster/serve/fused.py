"""The forward pass of a Llama-style model served with `--quantize int4`, its layers in one call
of supercluster's C++ kernels (`serve/kernels/decoder.cpp`), four kernels a layer:

    h = h + wo(attention(wqkv(rms_norm(h))))      wqkv with its norm folded in; attention with RoPE
    h = h + w2(swiglu(w13(rms_norm(h))))          and the cache writes folded in; w2 with SwiGLU

The model's own forward (`model/transformer.py`) computes the same in about twenty PyTorch ops a
layer. A decode step of one sequence multiplies one row by each matrix, so those ops' overhead
and the passes RMSNorm, RoPE and SiLU take over the activations cost about what the products
do. The model stays the owner of the weights: this holds references to them.
"""

from __future__ import annotations

import torch
from torch import nn

from supercluster.serve.kv_cache import PagedKVCache, StepAttention
from supercluster.serve.quantize import BlockLinear, rms_norm_eps


class FusedDecoder:
    def __init__(self, model: nn.Module, cache: PagedKVCache):
        from supercluster.serve.kernels import library

        self.model, self.cache = model, cache
        self.decoder_layers = library().decoder_layers.default
        self.weights, self.bits, self.out_features = [], [], []
        for block in model.layers.values():
            linears = (block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2)
            for norm, linear in zip((block.attention_norm, None, block.ffn_norm, None), linears):
                if norm is not None:
                    self.weights.append(norm.weight)
                self.weights += [linear.qweight, linear.d, linear.m]
                self.bits.append(linear.bits)
                self.out_features.append(linear.out_features)
        self.eps = rms_norm_eps(model.norm)
        self.heads = model.cfg.heads
        self.k_pools, self.v_pools = list(cache.k.unbind(0)), list(cache.v.unbind(0))
        self.scale = model.cfg.head_dim ** -0.5
        self.activation_bits = model.output.activation_bits

    @staticmethod
    def supports(model: nn.Module, cache: PagedKVCache) -> bool:
        """Whether `model` is a Llama-style model whose fused linears are all 4/8-bit blocks without
        biases and with one activation precision, one norm epsilon throughout, and the cache has the
        attention kernel."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or cache.kernel is None or getattr(cfg, "moe_experts", 0) or (cfg.norm, cfg.position, cfg.mlp, cfg.bias) != ("rmsnorm", "rope", "swiglu", False):
            return False
        blocks = list(model.layers.values())
        linears = [linear for block in blocks for linear in (block.attention.wqkv, block.attention.wo,
                                                               block.feed_forward.w13, block.feed_forward.w2)]
        norms = [norm for block in blocks for norm in (block.attention_norm, block.ffn_norm)] + [model.norm]
        return (bool(blocks) and all(isinstance(m, BlockLinear) and m.bias is None for m in [*linears, model.output])
                and len({m.activation_bits for m in [*linears, model.output]}) == 1
                and all(isinstance(n, nn.RMSNorm) and rms_norm_eps(n) == rms_norm_eps(model.norm) for n in norms))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: StepAttention) -> torch.Tensor:
        """tokens [T] of the step, packed -> logits [sequences, vocab] at each one's last token."""
        h = self.decoder_layers(self.model.tok_embeddings(tokens), self.weights, self.bits, self.out_features, self.eps,
                                self.heads, self.model.rope, cache.positions, cache.token_seq, cache.block_tables,
                                self.cache.block_size, self.k_pools, self.v_pools, self.scale, self.activation_bits)
        return self.model.output(h[cache.logits_index], norm=self.model.norm)
