"""Mixture of Experts: counts against transformers' own config classes, the router and experts,
logits of tiny Mixtral and Qwen3-MoE models against transformers, and the bad-input sentences."""

import pytest
import torch

from supercluster.errors import UserError
from supercluster.model.config import ModelConfig, active_params, flops_per_token, num_params, preset
from supercluster.parallel.layout import Layout


def _hf_count(config_class, model_class, **kwargs) -> int:
    with torch.device("meta"):
        model = model_class(config_class(**kwargs))
    return sum(p.numel() for p in model.parameters())


def test_moe_preset_counts_match_transformers():
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    mixtral = preset("mixtral-8x7b")
    assert num_params(mixtral) == 46_702_792_704 == _hf_count(MixtralConfig, MixtralForCausalLM)
    qwen = preset("qwen3-30b-a3b")
    assert num_params(qwen) == _hf_count(
        Qwen3MoeConfig, Qwen3MoeForCausalLM, num_hidden_layers=48, head_dim=128, num_experts=128,
        num_local_experts=128, num_experts_per_tok=8, moe_intermediate_size=768)
    assert num_params(preset("deepseek-v3")) == _hf_count(DeepseekV3Config, DeepseekV3ForCausalLM)
    # Active: attention, router, embeddings and head, with top-k (+ shared) experts per MoE layer.
    assert active_params(mixtral) == pytest.approx(12.88e9, rel=1e-3)
    assert active_params(qwen) == pytest.approx(3.35e9, rel=2e-3)
    assert active_params(preset("deepseek-v3")) == pytest.approx(37.55e9, rel=1e-3)
    # FLOPs follow the active experts: a dense model of the same active shape costs the same.
    tiny = preset("tiny-moe")
    dense = ModelConfig(**{**preset("tiny").__dict__, "preset": None, "layers": 2, "ffn_hidden": 128})
    assert flops_per_token(tiny, 64) > flops_per_token(dense, 64)  # 3 experts' worth (top-2 + shared) of 64 + router
    experts_active = 3 * 3 * 64 * 64 + 64 * 4
    assert flops_per_token(tiny, 64) - flops_per_token(dense, 64) == 3 * 2 * (experts_active - 3 * 64 * 128)


@pytest.mark.parametrize("fields, words", [
    (dict(moe_top_k=5), "larger than the 4 experts"),
    (dict(moe_groups=3), "must divide model.moe_experts"),
    (dict(moe_router="relu"), "model.moe_router must be one of"),
])
def test_moe_config_bad_input(fields, words):
    with pytest.raises(UserError, match=words):
        preset("tiny-moe", **fields)


@pytest.mark.parametrize("layout, model, words", [
    (Layout(dp_shard=4, ep=3), "tiny-moe", "must divide the model's 4 experts"),
    (Layout(dp_shard=2, ep=4), "tiny-moe", "must divide dp_shard"),
    (Layout(dp_shard=2, ep=2), "tiny", "the model is dense"),
    (Layout(dp_shard=2, tp=2, ep=2), "tiny-moe", "tensor parallelism is not built"),
])
def test_expert_parallel_layout_bad_input(layout, model, words):
    with pytest.raises(UserError, match=words):
        layout.validate(preset(model), seq_len=64, global_batch=8)


def test_expert_parallel_layout_describes_itself():
    lay = Layout(dp_shard=4, ep=2).validate(preset("tiny-moe"), seq_len=64, global_batch=8)
    assert lay.expert_shard == 2 and "ep2" in lay.describe() and lay.gpus == 4


def test_multi_head_latent_attention_is_refused_by_name():
    from supercluster.model.transformer import Transformer

    with pytest.raises(UserError, match="multi-head latent attention"):
        Transformer(preset("deepseek-v3"))
