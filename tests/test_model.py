"""Model presets against published parameter counts; the built model agrees with the counts."""

import pytest
import torch

from supercluster.errors import UserError
from supercluster.model.config import PRESETS, flops_per_token, num_params, preset
from supercluster.model.transformer import KVCache, Transformer, generate

# Published totals: GPT-2 from the released checkpoints (Radford et al. 2019), GPT-3 175B from
# Brown et al. 2020 (Table 2.1, "175.0B"), Llama 3 from Meta's model cards (8.03B, 70.6B, 405.9B).
PUBLISHED = {
    "gpt2-124m": (124_439_808, 0.0),  # exact
    "gpt2-1.5b": (1_557_611_200, 0.0),  # exact
    "gpt3-175b": (175.0e9, 0.005),
    "llama3-8b": (8_030_261_248, 0.0),  # exact, from the safetensors index
    "llama3-70b": (70_553_706_496, 0.0),
    "llama3-405b": (405_853_388_800, 0.0),
    "mixtral-8x7b": (46_702_792_704, 0.0),  # exact; these three are checked against transformers in test_moe
    "qwen3-30b-a3b": (30.53e9, 0.001),
    "deepseek-v3": (671.0e9, 0.001),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    expected, rel = PUBLISHED[name]
    assert num_params(preset(name)) == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("name", ["tiny", "small", "gpt2-124m", "llama3-8b"])
def test_built_model_has_the_counted_parameters(name):
    with torch.device("meta"):  # no memory for the big ones
        model = Transformer(preset(name))
    assert sum(p.numel() for p in model.parameters()) == num_params(preset(name))


def test_flops_per_token_follow_the_6n_rule():
    # GPT-3 175B at 2048 tokens: 6N plus attention, Megatron's count (Narayanan et al. eq. 3 / 4).
    cfg = preset("gpt3-175b")
    f = flops_per_token(cfg, 2048)
    l, h, s, v = cfg.layers, cfg.hidden, 2048, cfg.vocab_size
    megatron = 72 * s * l * h**2 * (1 + s / (6 * h) + v / (12 * l * h)) / s  # per token, no recompute
    assert f == pytest.approx(megatron, rel=0.01)
    assert f / (6 * num_params(cfg)) == pytest.approx(1.028, abs=0.005)  # attention adds ~3% at s=2048


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    for style in ({}, dict(norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True)):
        model = Transformer(preset("tiny", **style)).eval()
        x = torch.randint(0, 512, (1, 20))
        full = model(x)[0, -1]
        cache = KVCache()
        # prefill with a cache is causal in every layer (every position, not only the last)
        torch.testing.assert_close(model(x[:, :12], cache=cache), model(x[:, :12]), rtol=1e-4, atol=1e-5)
        for t in range(12, 20):
            last = model(x[:, t : t + 1], cache=cache)[0, -1]
        torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-5)


def test_generate_is_seeded_and_respects_greedy():
    model = Transformer(preset("tiny"))
    a = generate(model, [1, 2, 3], 10, generator=torch.Generator().manual_seed(1))
    b = generate(model, [1, 2, 3], 10, generator=torch.Generator().manual_seed(1))
    assert a == b and len(a) == 10
    greedy = generate(model, [1, 2, 3], 5, temperature=0)
    assert greedy == generate(model, [1, 2, 3], 5, temperature=0)
    long = generate(model, [1], 300)  # past max_seq_len (128): the cache restarts on a window
    assert len(long) == 300


@pytest.mark.parametrize("bad, message", [
    (dict(heads=5), "divisible by model.heads"),
    (dict(kv_heads=3), "divisible by model.kv_heads"),
    (dict(layers=0), "must be in 1..10,000"),
    (dict(hidden=99_999_999_996), "must be in 1..262,144"),
])
def test_bad_shapes_are_user_errors(bad, message):
    with pytest.raises(UserError, match=message):
        preset("tiny", **bad)


def test_unknown_preset_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'llama3-8b'"):
        preset("llama3-8")
    assert set(PUBLISHED) | {"tiny", "small", "llama-1b", "tiny-moe"} == set(PRESETS)


def test_llama_1b_has_llama_3_2_1b_blocks():
    """With Llama 3's 128,256-token vocabulary (tied) it is Llama 3.2 1B: 1.24B parameters."""
    assert num_params(preset("llama-1b", vocab_size=128256)) == pytest.approx(1.236e9, rel=0.005)
    assert num_params(preset("llama-1b")) == pytest.approx(1.04e9, rel=0.01)


@pytest.mark.parametrize("style", [{}, dict(norm="layernorm", mlp="gelu", position="learned", bias=True),
                                   dict(qk_norm=True), dict(qk_norm=True, qk_norm_per_head=False)],
                         ids=["llama", "gpt2", "qwen3", "olmoe"])
def test_fused_projections_compute_what_the_separate_ones_did(style):
    """Serving's fused q|k|v and gate|up matrices give the model's logits, with and without a KV
    cache, for the Llama layout (SwiGLU, GQA, RoPE), GPT-2's (GELU, learned positions, biases) and
    q and k normed per head (Qwen3) or over all heads (OLMoE)."""
    cfg = preset("tiny", **style)
    model = Transformer(cfg).eval()
    model.init_weights(seed=1)
    with torch.no_grad():  # biases start at zero: give them values the fusion must carry
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(tokens)
        cache = KVCache()
        model(tokens[:, :8], cache=cache)
        expected_step = model(tokens[:, 8:], cache=cache)
        model.fuse_projections()
        assert model.layers["0"].attention.wqkv is not None and not hasattr(model.layers["0"].attention, "wq")
        torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
        cache = KVCache()
        model(tokens[:, :8], cache=cache)
        torch.testing.assert_close(model(tokens[:, 8:], cache=cache), expected_step, atol=1e-5, rtol=1e-5)
