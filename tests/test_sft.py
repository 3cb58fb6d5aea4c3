"""Supervised fine-tuning: document masking, chat rendering and its loss mask, packing, the
masked loss, `train RUN_DIR`, and `eval` (loss, perplexity, multiple-choice tasks)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from supercluster.data.chat import ChatEncoder
from supercluster.data.packing import IGNORE, PackedSampler, first_fit
from supercluster.errors import UserError
from supercluster.model.config import preset
from supercluster.model.transformer import Transformer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The same rendering with transformers' answer markers: its assistant mask is the reference.
CHATML_MARKED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{'\n'}}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "Two and two make four.\nAnswer: 4"},
     {"role": "user", "content": "And three times three?"}, {"role": "assistant", "content": "Nine.\nAnswer: 9"}],
    [{"role": "user", "content": "Name a colour of the sky."}, {"role": "assistant", "content": " Blue, on a clear day. "}],
    [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes."}],
]


def chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [m["content"] for c in CONVERSATIONS for m in c] * 20 + ["user assistant system answer the a of"] * 20
    tok.train_from_iterator(text, trainer)
    return tok


def make_chat_run(root: Path) -> Path:
    """A tiny imported-style run directory: config, weights, tokenizer, specials, ChatML template."""
    from supercluster.model.weights import WEIGHTS_FILE, save_weights, stored_names
    from supercluster.train.config import Config

    run = root / "tiny-chat"
    run.mkdir(parents=True)
    tok = chat_tokenizer()
    tok.save(str(run / "tokenizer.json"))
    (run / "special_tokens.json").write_text(json.dumps({"bos": None, "eos": [tok.token_to_id("<|im_end|>")], "pad": None}))
    (run / "chat_template.jinja").write_text(CHATML)
    cfg = Config()
    cfg.model.preset = "tiny"
    cfg.train.seq_len, cfg.train.micro_batch, cfg.train.global_batch, cfg.train.steps = 64, 2, 4, 3
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.eval_every, cfg.train.checkpoint_every = 3e-3, 1, 3, 3
    cfg.train.precision = "fp32"
    cfg.run.dir = str(run)
    cfg.save(run / "config.toml")
    torch.manual_seed(0)
    model = Transformer(cfg.model_config())
    with torch.no_grad():  # sharper than a fresh init, whose near-uniform predictions hardly depend on context
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    state = model.state_dict()
    save_weights({k: state[k] for k in stored_names(model)}, run / WEIGHTS_FILE)
    return run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    return make_chat_run(tmp_path_factory.mktemp("sft"))


# ---- document masking ---------------------------------------------------------------------


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_document_mask_isolates_packed_documents(position):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", position=position)).eval()
    a, b = torch.randint(0, 512, (1, 21)), torch.randint(0, 512, (1, 34))
    packed = torch.cat([a, b], dim=1)
    documents = torch.cat([torch.zeros(1, 21), torch.ones(1, 34)], dim=1).long()
    with torch.no_grad():
        together, alone_a, alone_b = model(packed, documents=documents), model(a), model(b)
        one = model(packed, documents=torch.full_like(packed, 7))
        plain = model(packed)
    assert (together[:, :21] - alone_a).abs().max() < 1e-5
    assert (together[:, 21:] - alone_b).abs().max() < 1e-5
    assert (one - plain).abs().max() < 1e-5  # one document: the mask changes nothing
    assert (together[:, 21:] - plain[:, 21:]).abs().max() > 1e-3  # and the second document did see the first before


# ---- chat rendering and the loss mask -----------------------------------------------------


def test_chat_loss_mask_is_the_assistant_tokens(chat_run, chat_data):
    """Token by token, against transformers' own assistant mask for the same rendering; `data
    prepare --format chat` stores the same ids and mask."""
    from transformers import PreTrainedTokenizerFast

    from supercluster.data.prepared import PreparedDataset

    encoder = ChatEncoder.for_run(chat_run)
    reference = PreTrainedTokenizerFast(tokenizer_object=encoder.tokenizer)
    for messages in CONVERSATIONS:
        ids, mask = encoder.encode(messages)
        ref = reference.apply_chat_template(messages, chat_template=CHATML_MARKED, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert ids == ref["input_ids"]
        assert mask == ref["assistant_masks"]
        answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert encoder.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "".join(answers)
        assert encoder.template.render(messages, add_generation_prompt=False) == \
            encoder.tokenizer.decode(ids, skip_special_tokens=False)
    prepared = PreparedDataset(chat_data)
    for i, messages in enumerate(CONVERSATIONS):
        ids, mask = encoder.encode(messages)
        assert prepared.doc(i).tolist() == ids and prepared.loss_mask(i).tolist() == mask


def test_chat_rejects_bad_messages(chat_run):
    encoder = ChatEncoder.for_run(chat_run)
    for bad in ([], [{"role": "user", "content": "hi"}], [{"role": "robot", "content": "x"}],
                [{"role": "assistant", "content": "x", "tool_calls": []}]):
        with pytest.raises(UserError):
            encoder.encode(bad)


def test_tool_calling_conversations_train_the_calls_and_not_the_results(chat_run, tmp_path):
    """A row with `tools`, an assistant call, the tool's result and the final answer: rendered as the
    server renders that request (tools in Hermes' system prompt for a template without them), the calls
    and the answer trained, the tools and the result not; `data prepare` reads the row's tools."""
    from supercluster.data.pipeline import prepare
    from supercluster.data.prepared import PreparedDataset

    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4"},
                {"role": "assistant", "content": "Answer: 4"}]
    encoder = ChatEncoder.for_run(chat_run)
    ids, mask = encoder.encode(messages, tools=tools)
    text = encoder.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == encoder.template.render(messages, add_generation_prompt=False, tools=tools)
    assert text.startswith("<|im_start|>system\nYou may call these functions:") and "<tool_response>\n4\n</tool_response>" in text
    trained = encoder.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>Answer: 4<|im_end|>'
    rows = tmp_path / "tools.jsonl"
    rows.write_text(json.dumps({"messages": messages, "tools": tools}) + "\n")
    prepare([rows], tmp_path / "prepared", tokenizer=chat_run, fmt="chat")
    prepared = PreparedDataset(tmp_path / "prepared")
    assert prepared.doc(0).tolist() == ids and prepared.loss_mask(0).tolist() == mask
    for bad in ({"messages": messages, "tools": [{"type": "function"}]},
                {"messages": [{**messages[0], "audio": {}}, messages[-1]]}):
        rows.write_text(json.dumps(bad) + "\n")
        with pytest.raises(UserError, match="line 1 .*(tools|audio)"):
            prepare([rows], tmp_path / "refused", tokenizer=chat_run, fmt="chat")


# ---- packing --------------------------------------------------------------------------------


def test_first_fit_puts_each_document_in_the_first_bin_with_room():
    assert first_fit(np.array([5, 4, 3, 2, 6, 1]), 8) == [[0, 2], [1, 3, 5], [4]]


def test_packed_batches_hold_every_target_once_with_masks():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 34, size=50)  # n - 1 pairs <= seq_len: none cut
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(0, 1000, size=offsets[-1])
    mask = rng.integers(0, 2, size=offsets[-1]).astype(np.uint8)
    mask[offsets[:-1] + 1] = 1  # every document has a target to learn
    sampler = PackedSampler(tokens, offsets, mask, seq_len=32, batch_size=2)
    rows = sampler.rows_per_epoch
    x, y, docs = (torch.cat(t) for t in zip(*(sampler.batch(s) for s in range((rows + 1) // 2))))
    seen = []
    for r in range(rows):
        for d in docs[r].unique().tolist():
            if d < 0:
                assert (y[r][docs[r] == d] == IGNORE).all()  # padding counts nothing
                continue
            xs, ys = x[r][docs[r] == d].numpy(), y[r][docs[r] == d].numpy()
            # the document these pairs came from: inputs are its tokens, targets the masked next tokens
            k = next(i for i in range(50) if lengths[i] - 1 == len(xs) and (tokens[offsets[i]:offsets[i + 1] - 1] == xs).all())
            want = np.where(mask[offsets[k] + 1:offsets[k + 1]] > 0, tokens[offsets[k] + 1:offsets[k + 1]], IGNORE)
            assert (ys == want).all()
            seen.append(k)
    assert sorted(seen) == list(range(50))  # lengths < seq_len + 1: every document whole, exactly once an epoch
    assert sampler.truncated == 0
    assert rows < 50  # documents share rows
    again = PackedSampler(tokens, offsets, mask, seq_len=32, batch_size=2, dp_rank=1, dp_size=2)
    assert all((a == b).all() for a, b in zip(again.batch(3), (t[1:2] for t in sampler.batch(3))))


def test_masked_loss_is_the_mean_over_counted_targets():
    from supercluster.train.packed import masked_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, :3] = IGNORE
    y[1, 4] = IGNORE
    counted = [(b, s) for b in range(2) for s in range(5) if y[b, s] != IGNORE]
    manual = -sum(torch.log_softmax(logits[b, s], -1)[y[b, s]] for b, s in counted) / len(counted)
    assert abs(float(masked_loss(logits, y, len(counted))) - float(manual)) < 1e-6
    assert abs(float(F.cross_entropy(logits.flatten(0, 1), y.flatten())) - float(manual)) < 1e-6


# ---- training and evaluating a run directory ------------------------------------------------


def prepare_chat(run: Path, out: Path, conversations: int = 40) -> Path:
    """A prepared chat dataset, by `data prepare --format chat --tokenizer RUN_DIR`."""
    from supercluster.data.pipeline import prepare

    rows = out.with_suffix(".jsonl")
    rows.write_text("".join(json.dumps({"messages": CONVERSATIONS[i % len(CONVERSATIONS)]}) + "\n" for i in range(conversations)))
    prepare([rows], out, fmt="chat", tokenizer=run)
    return out


@pytest.fixture(scope="module")
def chat_data(chat_run, tmp_path_factory) -> Path:
    return prepare_chat(chat_run, tmp_path_factory.mktemp("prepared") / "chat")


def test_first_step_loss_is_the_masked_mean_of_its_batch(chat_run, chat_data, tmp_path):
    """The trainer's loss of step 1 (weights not yet updated) equals the masked mean over the
    global batch computed by hand, document by document, with the model alone on each."""
    from supercluster.train.config import load_config
    from supercluster.train.finetune import start_from
    from supercluster.train.sample import load_trained
    from supercluster.train.worker import run

    out = start_from(chat_run, tmp_path / "ft")
    # one row a microbatch: rows count different numbers of targets, so a mean per microbatch would differ
    cfg = load_config(out / "config.toml", [f"data.path={json.dumps(str(chat_data))}", "train.steps=1",
                                            "train.eval_every=0", "train.micro_batch=1"])
    summary = run(cfg)
    from supercluster.train.packed import open_packed

    packed = open_packed(cfg, 512, out)
    x, y, documents = packed.train.batch(0)
    assert any(len(set(row.tolist()) - {-1}) > 1 for row in documents)  # rows that pack documents together
    assert len({int((row != IGNORE).sum()) for row in y}) > 1
    model = load_trained(chat_run).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(x.shape[0]):
            for d in documents[r].unique().tolist():
                keep = (documents[r] == d) & (y[r] != IGNORE)
                if d < 0 or not keep.any():
                    continue
                logits = model(x[r][documents[r] == d][None])[0]  # the document alone, from position 0
                targets = y[r][documents[r] == d]
                counted = targets != IGNORE
                total += float(F.cross_entropy(logits[counted], targets[counted], reduction="sum"))
                count += int(counted.sum())
    assert summary["tokens_counted"] == count > 0
    assert abs(summary["loss"] - total / count) < 1e-4


def test_chat_data_in_a_mixture_is_the_masked_mean_of_its_global_batch(chat_run, chat_data, tmp_path):
    """Chat data read through data.mix (windows of the token stream, the loss mask kept): the
    trainer's step-1 loss and its evaluation are the mean over every counted target of the
    global batch, not a mean of per-microbatch means."""
    from supercluster.data.mixture import open_prepared
    from supercluster.train.config import load_config
    from supercluster.train.finetune import start_from
    from supercluster.train.sample import load_trained
    from supercluster.train.worker import run

    out = start_from(chat_run, tmp_path / "ft")
    cfg = load_config(out / "config.toml", [f"data.mix=[{{path = {json.dumps(str(chat_data))}, weight = 1.0}}]",
                                            "train.steps=1", "train.eval_every=1", "train.eval_batches=1",
                                            "data.val_fraction=0.3", "train.micro_batch=1"])
    summary = run(cfg)
    data = open_prepared(None, cfg.data.mix, cfg.data.val_fraction, 512, None)
    x, y = data.sampler(cfg.train.seq_len, cfg.train.global_batch, 0, 1, cfg.data.seed).next()
    counts = (y != IGNORE).sum(dim=1)
    assert len(set(counts.tolist())) > 1  # rows count different numbers of targets: the two means differ
    model = load_trained(chat_run).eval()

    def masked_mean(x, y) -> float:
        with torch.no_grad():
            logits = model(x)
        return float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
                     / (y != IGNORE).sum())

    assert summary["tokens_counted"] == int(counts.sum())
    assert abs(summary["loss"] - masked_mean(x, y)) < 1e-4
    (vx, vy), = data.eval_batches(cfg.train.seq_len, cfg.train.global_batch, 1, 0, 1, cfg.data.seed + 1)
    model = load_trained(out).eval()  # after the step
    assert abs(summary["val_loss"] - masked_mean(vx, vy)) < 1e-4


def test_train_run_dir_writes_a_new_run_that_sample_eval_and_export_read(chat_run, chat_data, tmp_path, capsys):
    from supercluster.cli.main import main

    before = {p.name: p.stat().st_mtime_ns for p in chat_run.iterdir()}
    out = tmp_path / "tuned"
    main(["train", str(chat_run), "--data", str(chat_data), "--out", str(out), "--set", "train.steps=4", "--no-sample", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["tokens_counted"] > 0 and math.isfinite(summary["val_loss"])
    assert {p.name: p.stat().st_mtime_ns for p in chat_run.iterdir()} == before  # the source is untouched
    for name in ("config.toml", "weights.safetensors", "tokenizer.json", "special_tokens.json", "chat_template.jinja"):
        assert (out / name).is_file()
    assert (out / "checkpoints" / "step_00000004").is_dir()
    main(["sample", str(out), "--chat", "--prompt", "What is 2 + 2?", "--tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().out.strip() != ""
    main(["eval", str(out), "--data", str(chat_data), "--json"])
    tuned = json.loads(capsys.readouterr().out)["data"]["loss"]
    main(["eval", str(chat_run), "--data", str(chat_data), "--json"])
    base = json.loads(capsys.readouterr().out)["data"]["loss"]
    assert tuned < base  # four steps on these conversations lower their loss
    main(["export", str(out), str(tmp_path / "tuned.safetensors")])
    assert (tmp_path / "tuned.safetensors").stat().st_size > 0
    # a folder that is not a run directory, --out on a config file, a layout the ranks cannot hold: one
    # sentence each, and no new run directory
    for argv in (["train", str(tmp_path), "--out", str(tmp_path / "x")], ["train", "--out", str(tmp_path / "x")],
                 ["train", str(chat_run), "--set", "parallel.pp=2", "--out", str(tmp_path / "x")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "x").exists()


def test_eval_loss_matches_a_manual_forward_pass(chat_run, chat_data):
    from supercluster.data.prepared import PreparedDataset
    from supercluster.train.evaluate import data_loss
    from supercluster.train.sample import load_trained

    result = data_loss(chat_run, chat_data, seq_len=64, batch=3)
    data = PreparedDataset(chat_data)
    model = load_trained(chat_run).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            ids = torch.tensor(np.asarray(data.doc(i), dtype=np.int64))
            mask = torch.tensor(np.asarray(data.loss_mask(i))[1:] > 0)
            logits = model(ids[None, :-1])[0]
            total += float(F.cross_entropy(logits[mask], ids[1:][mask], reduction="sum"))
            count += int(mask.sum())
    assert result["tokens_counted"] == count and result["documents"] == len(data)
    assert abs(result["loss"] - total / count) < 1e-5
    assert abs(result["perplexity"] - math.exp(total / count)) < 1e-3


def test_multiple_choice_scoring_by_log_likelihood(chat_run, tmp_path):
    from supercluster.data.tokenizer import load_tokenizer
    from supercluster.train.evaluate import score_tasks
    from supercluster.train.sample import load_trained

    tasks = tmp_path / "tasks.jsonl"
    rows = [{"question": "What is 2 + 2?", "choices": ["four", "Nine", "a blue sky"], "answer": 0},
            {"question": "Name a colour of the sky. ", "choices": ["Blue", "Answer"], "answer": "Blue"}]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score_tasks(chat_run, tasks)
    model, tok = load_trained(chat_run).eval(), load_tokenizer(chat_run / "tokenizer.json")
    correct = correct_norm = 0
    for row, got in zip(rows, result["results"]):
        question = row["question"].rstrip()
        trailing = row["question"][len(question):]
        context = tok.encode(question).ids
        scores = []
        for choice in row["choices"]:
            whole = tok.encode(question + trailing + " " + choice).ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0], -1)
            scores.append(sum(float(logprobs[p - 1, whole[p]]) for p in range(len(context), len(whole))))
        assert got["logprobs"] == pytest.approx(scores, abs=1e-4)
        answer = row["choices"].index(row["answer"]) if isinstance(row["answer"], str) else row["answer"]
        correct += int(np.argmax(scores)) == answer
        correct_norm += int(np.argmax([s / len(c) for s, c in zip(scores, row["choices"])])) == answer
    assert result["acc"] == correct / 2 and result["acc_norm"] == correct_norm / 2
    tasks.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(UserError, match="tasks.jsonl:1"):
        score_tasks(chat_run, tasks)


def test_document_mask_is_refused_where_it_cannot_run(chat_run, chat_data, small_corpus):
    from supercluster.train.config import load_config
    from supercluster.train.packed import open_packed, packs

    with pytest.raises(UserError, match="prepared dataset"):
        packs(load_config(None, [f"data.path={json.dumps(str(small_corpus))}", "data.document_mask=true"]))
    cfg = load_config(chat_run / "config.toml", [f"data.path={json.dumps(str(chat_data))}", "parallel.pp=2"])
    assert packs(cfg)
    with pytest.raises(UserError, match="pipeline or context"):
        open_packed(cfg, 512, chat_run)
    from supercluster.train.config import validate

    mixed = load_config(None, [f"data.mix=[{{path = {json.dumps(str(chat_data))}, weight = 1.0}}]", "data.document_mask=true"])
    with pytest.raises(UserError, match="not a mixture"):
        validate(mixed)
    mixed.data.document_mask = None
    assert not packs(mixed)  # a mixture reads windows, its chat data keeping the loss mask
