"""Mixture-of-Experts models imported and served: tiny Mixtral, Qwen3-MoE and OLMoE folders written by
transformers' own classes (`save_pretrained`, and the stacked layout transformers holds in
memory), GGUF files of the same weights (Mixtral's and Qwen3-MoE's) written by `gguf`'s writer, each imported and checked
against transformers as the independent reference: logits within 1e-4 in fp32, and the engine's
greedy output equal to transformers' `generate`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from supercluster.cli.main import main
from supercluster.serve.importing import import_model
from supercluster.train.sample import load_trained
from test_serve import greedy

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False,
              rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None)
PROMPTS = [[5, 17, 99, 3, 200, 41], [250, 7], list(range(60, 90))]


def byte_tokenizer() -> str:
    """A byte-level BPE over the 256 bytes alone: each token one byte, ids 0..255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, [], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


def hf_model(arch: str):
    from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    if arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, rope_theta=1e6))
    elif arch == "olmoe":  # q and k normed over all heads at once
        model = OlmoeForCausalLM(OlmoeConfig(**COMMON, num_experts=4, norm_topk_prob=False))
    else:  # head_dim wider than hidden / heads, a dense first layer, top-k not renormalised
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=32, head_dim=32,
                                                   norm_topk_prob=False, mlp_only_layers=[0]))
    with torch.no_grad():  # transformers initialises small: give every tensor a real value
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def write_gguf(model, path: Path, expert_count: int | None = None) -> Path:
    """`model`'s weights as llama.cpp's converter lays them out: llama (Mixtral) or qwen3moe."""
    import gguf
    from tokenizers import pre_tokenizers

    cfg = model.config
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(expert_count or getattr(cfg, "num_local_experts", None) or cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()))
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])

    def permute(t, n):  # llama.cpp's converter pairs rows for its RoPE (llama only)
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        t = t.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t)
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", t)
        else:
            _, _, layer, rest = name.split(".", 3)
            if rest.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate then up
                gate, up = np.split(t, 2, axis=1)
                w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
                w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(up))
            elif rest.endswith("experts.down_proj"):
                w.add_tensor(f"blk.{layer}.ffn_down_exps.weight", t)
            elif rest.endswith("gate.weight") and ("block_sparse_moe" in rest or rest.startswith("mlp.gate.")):
                w.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", t)
            else:
                module = rest.rsplit(".", 1)[0]
                if arch == "llama" and module == "self_attn.q_proj":
                    t = permute(t, heads)
                elif arch == "llama" and module == "self_attn.k_proj":
                    t = permute(t, kv_heads)
                w.add_tensor(f"blk.{layer}.{names[module]}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each architecture's source, built once for every test that asks."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build_source(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]
    return get


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "olmoe"])
def source(request, built):
    return built(request.param)


def build_source(arch: str, root: Path):
    """(transformers model, {hf: its saved folder, stacked: the same weights stacked as transformers
    holds them, gguf: a GGUF of them})."""
    from safetensors.torch import save_file

    model = hf_model(arch)
    model.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.json").write_text(byte_tokenizer())
    stacked = root / "stacked"
    stacked.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (stacked / name).write_text((root / "hf" / name).read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stacked / "model.safetensors"))
    gguf = write_gguf(model, root / "model.gguf")
    return model, {"hf": root / "hf", "stacked": stacked, "gguf": gguf}


@pytest.mark.parametrize("form", ["hf", "stacked", "gguf"])
def test_imported_moe_logits_equal_transformers(source, form, tmp_path):
    hf, paths = source
    summary = import_model(paths[form], tmp_path / "run")
    cfg = hf.config
    assert summary["experts"] == (getattr(cfg, "num_local_experts", None) or cfg.num_experts)
    assert summary["experts_per_token"] == cfg.num_experts_per_tok
    assert summary["parameters"] == sum(p.numel() for p in hf.parameters())
    model = load_trained(tmp_path / "run").eval()
    assert model.cfg.moe_dense_layers == len(getattr(cfg, "mlp_only_layers", []) or [])
    with torch.no_grad():
        for prompt in PROMPTS:
            tokens = torch.tensor([prompt])
            assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0), (form, prompt)


def engine_greedy(run: Path, prompts, max_tokens: int, **config) -> list[list[int]]:
    """Greedy continuations from the serving engine, all prompts submitted at once (one batch)."""
    from supercluster.serve.engine import Engine, EngineConfig

    engine = Engine(run, EngineConfig(num_blocks=64, block_size=8, **config))
    try:
        return greedy(engine, prompts, max_tokens)
    finally:
        engine.shutdown()


def test_engine_greedy_output_equals_transformers_generate(source, tmp_path):
    hf, paths = source
    import_model(paths["hf"], tmp_path / "run")
    want = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
            want.append(out[0, len(prompt):].tolist())
    assert engine_greedy(tmp_path / "run", PROMPTS, 6, precision="fp32") == want


def test_int4_experts_compute_their_blocks(source, tmp_path):
    """int4 experts: each expert's rows through the dense path's block kernel equal the same rows
    through that expert's dequantized weights (up to the int8 rounding of activations)."""
    from supercluster.model.moe import GroupedExperts
    from supercluster.serve.moe import QuantizedExperts
    from supercluster.serve.quantize import BlockLinear

    hf, paths = source
    import_model(paths["hf"], tmp_path / "run")
    model = load_trained(tmp_path / "run").eval()
    experts = next(m for m in model.modules() if isinstance(m, GroupedExperts))
    quantized = QuantizedExperts(experts, lambda linear: BlockLinear(linear, 4))
    counts = torch.tensor([3, 0, 5] + [2] * (experts.w1.shape[0] - 3))
    x = torch.randn(int(counts.sum()), experts.w1.shape[1], generator=torch.Generator().manual_seed(1))
    width = experts.w1.shape[2]
    ref = GroupedExperts(experts.w1.shape[0], experts.w1.shape[1], width)
    with torch.no_grad():
        ref.w1.copy_(torch.stack([m.dequantized()[:width].t() for m in quantized.w13]))
        ref.w3.copy_(torch.stack([m.dequantized()[width:].t() for m in quantized.w13]))
        ref.w2.copy_(torch.stack([m.dequantized().t() for m in quantized.w2]))
        ref.use_grouped_mm = False
        want, got = ref(x, counts), quantized(x, counts)
    assert (got - want).norm() / want.norm() < 0.02
    # and the whole model served in int4 answers every prompt (routers in fp32, experts in blocks)
    outputs = engine_greedy(tmp_path / "run", PROMPTS, 3, quantize="int4")
    assert [len(o) for o in outputs] == [3] * len(PROMPTS)


def test_auto_keeps_experts_on_the_4bit_grid_and_leaves_others_stacked(source, tmp_path):
    """--quantize auto: a model whose matrices (experts included) are 4-bit blocks already serves
    them as blocks, each expert's exactly; one expert matrix off the grid and every matrix stays fp32."""
    from supercluster.model.moe import GroupedExperts
    from supercluster.serve.moe import QuantizedExperts, is_router
    from supercluster.serve.quantize import BlockLinear, quantize, weight_format

    hf, paths = source
    import_model(paths["hf"], tmp_path / "run")

    model = load_trained(tmp_path / "run").eval().fuse_projections()
    with torch.no_grad():
        routers = {id(m) for r in model.modules() if is_router(r) for m in r.modules()}
        for module in list(model.modules()):
            if isinstance(module, torch.nn.Linear) and module is not model.output and id(module) not in routers:
                module.weight.copy_(BlockLinear(module, 4).dequantized())
            if isinstance(module, GroupedExperts):
                for w in (module.w1, module.w3, module.w2):  # [E, in, out]: blocks run along `in`
                    for e in range(w.shape[0]):
                        linear = torch.nn.Linear(w.shape[1], w.shape[2], bias=False)
                        linear.weight.copy_(w[e].t())
                        w[e].copy_(BlockLinear(linear, 4).dequantized().t())
    served = quantize(model, "auto")
    assert weight_format(served) == "int4"
    experts = [m for m in served.modules() if isinstance(m, QuantizedExperts)]
    assert experts and all(e.exact for e in experts)
    assert not any(isinstance(m, GroupedExperts) for m in served.modules())

    model = load_trained(tmp_path / "run").eval().fuse_projections()  # trained weights: off the grid
    served = quantize(model, "auto")
    assert weight_format(served) == "none"
    assert any(isinstance(m, GroupedExperts) for m in served.modules())


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # what building the source printed
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(model_type="deepseek_v3"), "'deepseek_v3' model; only the llama, mixtral, qwen3_moe and olmoe"),
    (lambda c: c.update(num_local_experts=5), "has 4 of layer 0's 5 experts' w1 (expert 4 missing)"),
    (lambda c: c.update(num_local_experts=3), "for expert 3, but its config.json counts 3 experts"),
    (lambda c: c.pop("num_local_experts"), "lacks its expert counts"),
    (lambda c: c.update(num_experts_per_tok=9), "moe_top_k (9) is larger than the 4 experts"),
])
def test_bad_moe_folders_are_one_sentence(built, change, message, tmp_path, capsys):
    hf, paths = built("mixtral")
    folder = tmp_path / "bad"
    folder.mkdir()
    for file in paths["hf"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "run"
    code, err = run_cli(capsys, "import", str(folder), "--out", str(out))
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_gguf_whose_expert_count_disagrees_with_its_tensors_is_one_sentence(built, tmp_path, capsys):
    hf, _ = built("mixtral")
    path = write_gguf(hf, tmp_path / "bad.gguf", expert_count=5)
    out = tmp_path / "out" / "run"
    code, err = run_cli(capsys, "import", str(path), "--out", str(out))
    assert code == 2
    assert "has 4 experts in" in err and "but llama.expert_count says 5" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_tensor_parallel_serving_of_an_moe_model_is_refused_by_name(built, tmp_path):
    from supercluster.errors import UserError
    from supercluster.serve.engine import Engine, EngineConfig

    _, paths = built("mixtral")
    import_model(paths["hf"], tmp_path / "run")
    with pytest.raises(UserError, match="Mixture-of-Experts model, which serves on one rank; drop --tp"):
        Engine(tmp_path / "run", EngineConfig(tp=2))
