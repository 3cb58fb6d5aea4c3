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
    paged_runner(served, served.cfg, fused=True)  # and it decodes in one call

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


def paged_runner(model, cfg, fused: bool, kv_dtype=torch.float16):
    """A LocalRunner on `model` with a KV cache of its own: the one-call int4 decoder, or the model's forward."""
    from supercluster.serve.kv_cache import PagedKVCache
    from supercluster.serve.runner import LocalRunner

    cache = PagedKVCache(cfg.layers, 32, 8, cfg.kv_heads, cfg.head_dim, kv_dtype, torch.device("cpu"))
    runner = LocalRunner(model, cache, torch.device("cpu"))
    if fused:
        assert runner.fused is not None
    else:
        runner.fused = None
    return runner


def assert_steps_agree(fused, unfused, prompts: list[list[int]], decode_steps: int = 3) -> None:
    """Both runners through the same steps give the same logits: the prompts prefilled together in
    two steps (the last one split across them, the first decode tokens of the others in the second),
    then steps decoding every sequence at once, each fed the greedy tokens of the last step."""
    from supercluster.serve.runner import StepBatch

    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(prompts))]
    cut = len(prompts[-1]) // 2
    first = StepBatch([t for p in prompts[:-1] for t in p] + prompts[-1][:cut],
                      [(0, len(p), table) for p, table in zip(prompts[:-1], tables)] + [(0, cut, tables[-1])])
    steps = [first]
    positions = [len(p) for p in prompts[:-1]] + [cut]
    for step in range(decode_steps + 1):
        expected, got = unfused.run(steps[-1]), fused.run(steps[-1])
        assert got.shape == expected.shape == (len(prompts), expected.shape[1])
        # as tests/test_serve.py's dense equal: a last-bit difference (the kernel's RoPE, its norms)
        # may move an activation across a rounding step of its 16-bit blocks (seen: 1.1e-4 of the largest logit)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
        if step == decode_steps:
            break
        new = got.argmax(-1).tolist()
        if step == 0:  # the last prompt's rest, the others' first decoded tokens
            rest = prompts[-1][cut:]
            steps.append(StepBatch([*new[:-1], *rest], [(pos, 1, table) for pos, table in zip(positions[:-1], tables)]
                                   + [(cut, len(rest), tables[-1])]))
            positions = [pos + 1 for pos in positions[:-1]] + [len(prompts[-1])]
        else:
            steps.append(StepBatch(new, [(pos, 1, table) for pos, table in zip(positions, tables)]))
            positions = [pos + 1 for pos in positions]


def test_int4_moe_layers_in_one_call_compute_the_models_own_forward(source, tmp_path):
    """An int4 MoE model decodes in one C++ call a step (router in fp32, tokens grouped by expert,
    each chosen expert's blocks on its own rows): the same logits as the model's own forward over
    the same int4 weights, prefill and decode, several sequences batched, and the same greedy
    tokens from the engine."""
    from supercluster.serve.engine import Engine, EngineConfig

    hf, paths = source
    import_model(paths["hf"], tmp_path / "run")
    engine = Engine(tmp_path / "run", EngineConfig(num_blocks=64, block_size=8, quantize="int4"))
    engine.shutdown()
    assert engine.runner.fused is not None and engine.runner.fused.routing["experts"].count(0) == \
        len(getattr(hf.config, "mlp_only_layers", []) or [])
    assert_steps_agree(engine.runner, paged_runner(engine.model, engine.cfg, fused=False), PROMPTS)

    outputs = {}
    for fused in (True, False):
        engine = Engine(tmp_path / "run", EngineConfig(num_blocks=64, block_size=8, quantize="int4"))
        try:
            if not fused:
                engine.runner.fused = None
            outputs[fused] = greedy(engine, PROMPTS, 8)
        finally:
            engine.shutdown()
    assert outputs[True] == outputs[False] and all(len(o) == 8 for o in outputs[True])


def int4_tiny_moe(method: str = "int4", **fields):
    """tiny-moe (one shared expert, a dense first layer) with `fields`, random weights and expert
    biases, quantized by `method`."""
    from supercluster.model.config import preset
    from supercluster.model.transformer import Transformer
    from supercluster.serve.quantize import quantize

    cfg = preset("tiny-moe", **fields)
    model = Transformer(cfg).eval()
    model.init_weights(seed=3)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):  # used where moe_bias_update_rate > 0: let it change choices
                buffer.copy_(torch.rand(buffer.shape, generator=torch.Generator().manual_seed(4)) * 0.2)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return quantize(model.fuse_projections(), method), cfg


@pytest.mark.parametrize("fields", [
    {},  # softmax, renormalised top-2 of 4, a shared expert, a dense first layer
    dict(moe_experts=8, moe_top_k=3, moe_norm_topk=False, moe_shared_experts=0, moe_dense_layers=0),
    dict(moe_experts=6, moe_top_k=1),
    # DeepSeek-V3's: sigmoid scores, the bias choosing, 2 of 4 groups, renormalised and scaled
    dict(moe_experts=8, moe_top_k=2, moe_router="sigmoid", moe_groups=4, moe_topk_groups=2,
         moe_bias_update_rate=0.01, moe_route_scale=2.5),
], ids=["tiny-moe", "top3-unnormalised", "top1", "deepseek"])
def test_every_router_configuration_runs_in_one_call(fields):
    """Each router the model builds runs in the one-call decoder as Router.forward computes it."""
    model, cfg = int4_tiny_moe(**fields)
    assert_steps_agree(paged_runner(model, cfg, fused=True), paged_runner(model, cfg, fused=False),
                       [[5, 17, 99, 3, 200, 41], [250, 7], list(range(60, 90))])


def test_what_the_one_call_decoder_does_not_implement_runs_the_models_forward():
    """Biases, int8 experts and experts sent to other ranks are refused by `supports`; the first two
    serve through the model's forward, a step's logits those of the whole sequence at once."""
    from supercluster.serve.fused import FusedDecoder
    from supercluster.serve.runner import StepBatch

    biased, cfg = int4_tiny_moe(bias=True)
    int4, _ = int4_tiny_moe()
    for layer in int4.layers.values():
        layer.feed_forward.dispatcher = object()
    int8, _ = int4_tiny_moe("int8")
    for model in (biased, int4, int8):
        assert not FusedDecoder.supports(model, paged_runner(model, cfg, fused=False).cache)
    prompt = list(range(60, 90))
    for model in (biased, int8):
        runner = paged_runner(model, cfg, fused=False, kv_dtype=torch.float32)
        with torch.no_grad():
            whole = model(torch.tensor([prompt]))[0]
        runner.run(StepBatch(prompt[:20], [(0, 20, [0, 1, 2, 3])]))
        got = runner.run(StepBatch(prompt[20:], [(20, 10, [0, 1, 2, 3])], logits=[10]))
        torch.testing.assert_close(got, whole[20:], rtol=1e-4, atol=1e-4 * whole.abs().max().item())
