"""The forward pass of a Llama-style model served with `--quantize int4`, its layers in one call
of supercluster's C++ kernels (`serve/kernels/decoder.cpp`), four kernels a layer:

    h = h + wo(attention(wqkv(rms_norm(h))))      wqkv with its norm folded in; attention with RoPE
    h = h + w2(swiglu(w13(rms_norm(h))))          and the cache writes folded in; w2 with SwiGLU

and q and k normed before RoPE where the model does (Qwen3, Qwen3-MoE: per head; OLMoE: over all
heads), on the q and k parts of the one wqkv product.

A Mixture-of-Experts layer (`model/moe.py`, experts as `serve/moe.py`'s QuantizedExperts) runs its
feed-forward in the same call: the router's logits in fp32 from its own fp32 weight, the scores,
top-k choice and weights exactly as `Router.forward` computes them (softmax or sigmoid, the
expert bias used only to choose, group-limited routing, renormalisation, route scale: every
configuration the model builds), the step's tokens grouped by expert with each chosen expert's
w13 and w2 (SwiGLU folded in) on its own rows only, as llama.cpp's `mul_mat_id` indexes rows by
expert, the weighted sum in fp32, shared experts, the residual. Dense layers of an MoE model
(DeepSeek's and Qwen3-MoE's first ones) run as above.

The model's own forward (`model/transformer.py`) computes the same in about twenty PyTorch ops a
layer (an MoE layer: some thirty, and a Python loop over its experts). A decode step of one
sequence multiplies one row by each matrix, so those ops' overhead and the passes RMSNorm, RoPE
and SiLU take over the activations cost about what the products do. The model stays the owner of
the weights: this holds references to them.

Not fused (`supports` is False, the model's forward runs): biases, other norms, positions or MLPs,
matrices not in 4/8-bit blocks (`--quantize int8`, fp32), and an MoE layer whose experts sit on
other ranks (a dispatcher).
"""

from __future__ import annotations

import torch
from torch import nn

from supercluster.model.moe import MoE
from supercluster.serve.kv_cache import PagedKVCache, StepAttention
from supercluster.serve.moe import QuantizedExperts
from supercluster.serve.quantize import BlockLinear, rms_norm_eps


class FusedDecoder:
    def __init__(self, model: nn.Module, cache: PagedKVCache):
        from supercluster.serve.kernels import library

        self.model, self.cache = model, cache
        self.decoder_layers = library().decoder_layers.default
        self.weights, self.bits, self.out_features, self.experts = [], [], [], []
        cfg = model.cfg

        def add(*linears: BlockLinear) -> None:
            for linear in linears:
                self.weights += [linear.qweight, linear.d, linear.m]
                self.bits.append(linear.bits)
                self.out_features.append(linear.out_features)

        for block in model.layers.values():
            ffn = block.feed_forward
            self.weights.append(block.attention_norm.weight)
            if cfg.qk_norm:
                self.weights += [block.attention.q_norm.weight, block.attention.k_norm.weight]
            add(block.attention.wqkv, block.attention.wo)
            self.weights.append(block.ffn_norm.weight)
            if isinstance(ffn, MoE):  # decoder.cpp's moe_ffn: router, expert bias, experts, shared experts
                self.weights.append(ffn.router.gate.weight.float())
                if cfg.moe_bias_update_rate > 0:
                    self.weights.append(ffn.router.expert_bias)
                for w13, w2 in zip(ffn.experts.w13, ffn.experts.w2):
                    add(w13, w2)
                if ffn.shared is not None:
                    add(ffn.shared["w1"], ffn.shared["w3"], ffn.shared["w2"])
                self.experts.append(cfg.moe_experts)
            else:
                add(ffn.w13, ffn.w2)
                self.experts.append(0)
        self.routing = {}
        if any(self.experts):
            self.routing = dict(experts=self.experts, top_k=cfg.moe_top_k, sigmoid=cfg.moe_router == "sigmoid",
                                norm_topk=cfg.moe_norm_topk, route_scale=cfg.moe_route_scale, groups=cfg.moe_groups,
                                topk_groups=cfg.moe_topk_groups, expert_bias=cfg.moe_bias_update_rate > 0,
                                shared=cfg.moe_shared_experts > 0)
        self.qk_norm = 0 if not cfg.qk_norm else 1 if cfg.qk_norm_per_head else 2
        self.eps = rms_norm_eps(model.norm)
        self.heads = cfg.heads
        self.k_pools, self.v_pools = list(cache.k.unbind(0)), list(cache.v.unbind(0))
        self.scale = cfg.head_dim ** -0.5
        self.activation_bits = model.output.activation_bits

    @staticmethod
    def supports(model: nn.Module, cache: PagedKVCache) -> bool:
        """Whether `model` is a Llama-style model whose fused linears (experts' included) are all
        4/8-bit blocks without biases and with one activation precision, one norm epsilon throughout,
        its MoE layers (if any) routed on this process with an fp32 router, and the cache has the
        attention kernel."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or cache.kernel is None or (cfg.norm, cfg.position, cfg.mlp, cfg.bias) != ("rmsnorm", "rope", "swiglu", False):
            return False
        blocks = list(model.layers.values())
        linears = [model.output]
        for block in blocks:
            ffn = block.feed_forward
            linears += [block.attention.wqkv, block.attention.wo]
            if isinstance(ffn, MoE):
                if not isinstance(ffn.experts, QuantizedExperts) or ffn.dispatcher is not None or \
                        ffn.router.gate.weight.device.type != "cpu":
                    return False
                linears += [*ffn.experts.w13, *ffn.experts.w2]
                linears += [] if ffn.shared is None else [ffn.shared["w1"], ffn.shared["w3"], ffn.shared["w2"]]
            else:
                linears += [getattr(ffn, "w13", None), ffn.w2]
        norms = [norm for block in blocks for norm in (block.attention_norm, block.ffn_norm)] + [model.norm]
        if cfg.qk_norm:
            norms += [norm for block in blocks for norm in (block.attention.q_norm, block.attention.k_norm)]
        return (bool(blocks) and all(isinstance(m, BlockLinear) and m.bias is None for m in linears)
                and len({m.activation_bits for m in linears}) == 1
                and all(isinstance(n, nn.RMSNorm) and rms_norm_eps(n) == rms_norm_eps(model.norm) for n in norms))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: StepAttention) -> torch.Tensor:
        """tokens [T] of the step, packed -> logits [sequences, vocab] at each one's last token."""
        h = self.decoder_layers(self.model.tok_embeddings(tokens), self.weights, self.bits, self.out_features, self.eps,
                                self.heads, self.model.rope, cache.positions, cache.token_seq, cache.block_tables,
                                self.cache.block_size, self.k_pools, self.v_pools, self.scale, self.activation_bits,
                                qk_norm=self.qk_norm, **self.routing)
        return self.model.output(h[cache.logits_index], norm=self.model.norm)
