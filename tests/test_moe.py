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


def _ours_from_hf(hf_model, cfg) -> dict:
    """Our state dict from a transformers Mixtral or Qwen3-MoE model (stacked experts: gate_up_proj
    [E, 2I, H] as [gate | up], down_proj [E, H, I])."""
    out = {}
    for name, t in hf_model.state_dict().items():
        t = t.float()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            pre = f"layers.{layer}."
            if rest.endswith("experts.gate_up_proj"):
                gate, up = t.chunk(2, dim=1)
                out[pre + "feed_forward.experts.w1"] = gate.transpose(1, 2).contiguous()
                out[pre + "feed_forward.experts.w3"] = up.transpose(1, 2).contiguous()
            elif rest.endswith("experts.down_proj"):
                out[pre + "feed_forward.experts.w2"] = t.transpose(1, 2).contiguous()
            elif rest == "mlp.gate.weight":
                out[pre + "feed_forward.router.gate.weight"] = t
            else:
                rest = (rest.replace("self_attn.q_proj", "attention.wq").replace("self_attn.k_proj", "attention.wk")
                        .replace("self_attn.v_proj", "attention.wv").replace("self_attn.o_proj", "attention.wo")
                        .replace("self_attn.q_norm", "attention.q_norm").replace("self_attn.k_norm", "attention.k_norm")
                        .replace("input_layernorm", "attention_norm").replace("post_attention_layernorm", "ffn_norm"))
                out[pre + rest] = t
        elif name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_logits_match_transformers(arch):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from supercluster.model.transformer import Transformer

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
                  tie_word_embeddings=False, rms_norm_eps=1e-6)
    if arch == "mixtral":
        hf_cfg = MixtralConfig(**common, num_local_experts=4, rope_theta=1e6)
        hf = MixtralForCausalLM(hf_cfg)
        ours = ModelConfig(layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=96, vocab_size=256, max_seq_len=64,
                           rope_theta=1e6, norm_eps=1e-6, moe_experts=4, moe_top_k=2)
    else:
        hf_cfg = Qwen3MoeConfig(**common, num_experts=8, num_local_experts=8, moe_intermediate_size=32, head_dim=32,
                                norm_topk_prob=True)
        hf = Qwen3MoeForCausalLM(hf_cfg)
        ours = ModelConfig(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, qk_norm=True, ffn_hidden=96,
                           vocab_size=256, max_seq_len=64, rope_theta=hf_cfg.rope_parameters["rope_theta"],
                           norm_eps=1e-6, moe_experts=8, moe_top_k=2, moe_hidden=32)
    torch.manual_seed(0)
    with torch.no_grad():  # transformers initialises experts to zero-ish: give every tensor a real value
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    model = Transformer(ours.validate())
    missing, unexpected = model.load_state_dict(_ours_from_hf(hf, ours), strict=False)
    assert not unexpected and all("expert_bias" in k for k in missing)
    tokens = torch.randint(0, 256, (2, 24))
    hf.eval(), model.eval()
    with torch.no_grad():
        want = hf(tokens).logits
        for grouped in (True, False):
            for m in model.modules():
                if hasattr(m, "use_grouped_mm"):
                    m.use_grouped_mm = grouped
            assert torch.allclose(model(tokens), want, atol=1e-4, rtol=0), grouped


def test_group_limited_sigmoid_router_and_balancing():
    from supercluster.model.moe import MoE, balance_step

    cfg = preset("tiny-moe", moe_experts=8, moe_top_k=2, moe_groups=4, moe_topk_groups=1, moe_router="sigmoid",
                 moe_bias_update_rate=0.01, moe_aux_loss_coef=0.0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(64, cfg.hidden)
    weights, experts, _ = moe.router(x)
    assert (experts // 2 == experts[:, :1] // 2).all()  # both experts from one group of 2
    assert torch.allclose(weights.sum(-1), torch.ones(64))  # renormalised (route scale 1)
    moe(x[None])
    load = moe.tokens_per_expert.clone()
    metrics = balance_step([moe])
    bias = moe.router.expert_bias
    assert (bias[load > load.mean()] < 0).all() and (bias[load < load.mean()] > 0).all()
    assert metrics["moe_bias_abs_max"] == pytest.approx(0.01)
    assert metrics["moe_load_max_over_mean/0"] == pytest.approx(float(load.max() / load.mean()))
    assert moe.tokens_per_expert.sum() == 0


def test_aux_loss_metric_is_the_mean_over_a_steps_microbatches():
    """Two microbatches before one optimizer step: the logged aux loss is their mean (it was the last's)."""
    from supercluster.model.moe import MoE, balance_step

    cfg = preset("tiny-moe", moe_experts=8, moe_top_k=2, moe_aux_loss_coef=0.01)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    batches = [torch.randn(1, 16, cfg.hidden), 3 * torch.randn(1, 16, cfg.hidden) + 1]
    each = []
    for x in batches:
        _, experts, scores = moe.router(x.reshape(-1, cfg.hidden))
        each.append(float(moe.aux_loss(scores, torch.bincount(experts.flatten(), minlength=8), 2)))
        moe(x).sum().backward()
    assert each[0] != pytest.approx(each[1], rel=1e-3)
    assert balance_step([moe])["moe_aux_loss"] == pytest.approx(sum(each) / 2, rel=1e-5)
    with torch.no_grad():  # evaluation passes do not count
        moe(batches[0])
    assert "moe_aux_loss" not in balance_step([moe])


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_hf_moe_folder_imports_to_the_same_logits(tmp_path, small_corpus, arch):
    """`supercluster import` of a Mixtral or Qwen3-MoE folder (experts stored one by one, as the
    hub has them): the imported run's logits are transformers' within 1e-4."""
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from supercluster.data.tokenizer import EOT, train_tokenizer
    from supercluster.serve.importing import import_model
    from supercluster.train.sample import load_trained

    docs = [p.read_text() for p in sorted(small_corpus.iterdir())]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(docs, 320), eos_token=EOT, bos_token=EOT)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    if arch == "mixtral":
        hf = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4))
    else:
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=4, num_local_experts=4, moe_intermediate_size=32,
                                                head_dim=32, norm_topk_prob=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    hf.eval().save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    import_model(tmp_path / "hf", tmp_path / "run")
    model = load_trained(tmp_path / "run")
    assert model.cfg.moe_experts == 4 and model.cfg.qk_norm == (arch == "qwen3_moe")
    ids = torch.tensor([tok("import json\nprint(json.dumps({'a': 1}))").input_ids])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_moe_block_recomputes_under_activation_checkpointing():
    """The grouped_mm probe may first run inside a checkpointed block: recomputation still saves
    what the forward saved, and the gradients are those of the plain block."""
    from torch.utils.checkpoint import checkpoint

    from supercluster.model.moe import MoE, grouped_mm_works

    torch.manual_seed(0)
    moe = MoE(preset("tiny-moe"))
    moe.experts.use_grouped_mm = True  # the probe runs only where grouped_mm is wanted (fp32 on CPU: not by default)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 16, 64)
    moe(x).square().sum().backward()
    want = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    grouped_mm_works.cache_clear()
    checkpoint(moe, x, use_reentrant=False).square().sum().backward()
    assert grouped_mm_works.cache_info().misses == 1  # the probe ran, first inside the checkpointed block
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(moe.parameters(), want))
