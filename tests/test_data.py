"""data: corpora, tokenizer, cached shards and the sampler, on tiny corpora made here."""

import json

import numpy as np
import pytest
import torch

from supercluster.data import BatchSampler, eval_batches, load_tokenizer, prepare_data
from supercluster.data import prepare as prepare_module
from supercluster.data.corpus import load_corpus, stdlib_files
from supercluster.data.tokenizer import EOT
from supercluster.errors import UserError

TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "class Greeter:\n    \"\"\"Says hello.\"\"\"\n\n    def greet(self, name):\n        return f'hello {name}!'\n"
)
UNICODE = "naïve café — 東京 😀 Ωμέγα\t tabs\t\tand  double  spaces\r\nCRLF line\n\n\n   trailing   "


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        (folder / f"f{i}.py").write_text(TEXT.replace("fibonacci", f"fib{i}") * 4)
    (folder / "sub" / "uni.txt").write_text(UNICODE * 3)
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0binary")  # skipped: not text
    (folder / ".hidden").write_text("never read")
    return folder


def put(path, content):
    """Create a file (str or bytes content) or, for None, an empty folder; return its path."""
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def prep(path, tmp_path, vocab_size=300, **kw):
    return prepare_data(path, vocab_size, cache_dir=tmp_path / "cache", **kw)


# ---- corpus and tokenizer ------------------------------------------------------------


def test_folder_corpus_reads_text_files_in_sorted_order_and_skips_binary_and_hidden(corpus_dir):
    corpus = load_corpus(corpus_dir, max_mb=None)
    assert len(corpus.documents) == 7
    assert corpus.documents[0].startswith("def fib0") and corpus.documents[-1].startswith(UNICODE)
    assert not any("never read" in d or "PNG" in d for d in corpus.documents)


def test_max_mb_cuts_the_corpus_exactly_even_inside_a_file(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("é" * 1000)  # 2 bytes per character: a cut can fall inside one
    corpus = load_corpus(path, max_mb=0.000101)  # 101 bytes
    assert corpus.documents == ["é" * 50]


def test_tokenizer_round_trips_any_text_exactly(corpus_dir, tmp_path):
    bundle = prep(corpus_dir, tmp_path)
    tok = load_tokenizer(bundle.tokenizer_path)
    assert tok.get_vocab_size() <= 300 and tok.token_to_id(EOT) == 0
    # unicode, whitespace runs, CRLF, and characters never seen in training (byte fallback)
    for text in [TEXT, UNICODE, "   leading", "x\n\n\n\ty", "\u0000\u00ff\U0001f9e0 ∮ E⋅da = Q", ""]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.get_vocab_size() > 257  # merges were learned, not only the byte alphabet


def test_shards_hold_the_corpus_tokens_with_eot_between_documents(corpus_dir, tmp_path):
    bundle = prep(corpus_dir, tmp_path)
    assert bundle.train.dtype == np.uint16 and isinstance(bundle.train, np.memmap)
    tokens = np.concatenate([bundle.train, bundle.val])
    assert bundle.n_tokens == len(tokens)
    assert int(tokens.max()) < bundle.vocab_size
    docs = load_corpus(corpus_dir, None).documents
    assert (tokens == 0).sum() == len(docs) and tokens[-1] == 0  # one EOT after each document
    tok = load_tokenizer(bundle.tokenizer_path)
    assert tok.decode(tokens.tolist()) == "".join(docs)  # decode drops EOT
    assert len(bundle.val) == round(len(tokens) * 0.05)


def test_a_big_document_is_encoded_in_pieces_without_changing_the_text(tmp_path, monkeypatch):
    from supercluster.data import shards

    monkeypatch.setattr(shards, "PIECE_CHARS", 50)
    monkeypatch.setattr(shards, "BATCH_CHARS", 120)  # several encode_batch calls too
    path = tmp_path / "big.txt"
    path.write_text(TEXT * 5)
    bundle = prep(path, tmp_path)
    tokens = np.concatenate([bundle.train, bundle.val]).tolist()
    assert tokens.count(0) == 1
    assert load_tokenizer(bundle.tokenizer_path).decode(tokens) == TEXT * 5


# ---- the cache -----------------------------------------------------------------------


def test_second_call_hits_the_cache(corpus_dir, tmp_path, monkeypatch):
    first = prep(corpus_dir, tmp_path)
    calls = []
    monkeypatch.setattr(prepare_module, "_build", lambda *a: calls.append(a))
    second = prep(corpus_dir, tmp_path)
    assert calls == []
    assert np.array_equal(first.train, second.train) and first.tokenizer_path == second.tokenizer_path


def test_cache_key_follows_content_vocab_and_split(corpus_dir, tmp_path):
    base = prep(corpus_dir, tmp_path).tokenizer_path.parent
    assert prep(corpus_dir, tmp_path, vocab_size=320).tokenizer_path.parent != base
    assert prep(corpus_dir, tmp_path, val_fraction=0.1).tokenizer_path.parent != base
    (corpus_dir / "f0.py").write_text("changed = True\n" * 50)
    assert prep(corpus_dir, tmp_path).tokenizer_path.parent != base


def test_a_crashed_build_leaves_nothing_that_is_trusted(corpus_dir, tmp_path, monkeypatch):
    from supercluster.data import shards

    def crash(*a, **k):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(prepare_module, "write_tokens", crash)
    with pytest.raises(RuntimeError):
        prep(corpus_dir, tmp_path)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(prepare_module, "write_tokens", shards.write_tokens)
    bundle = prep(corpus_dir, tmp_path)  # builds afresh
    assert json.loads((bundle.tokenizer_path.parent / "meta.json").read_text())["n_tokens"] == bundle.n_tokens


def test_default_corpus_is_the_stdlib_capped_by_max_mb(tmp_path):
    files = stdlib_files()
    assert files == stdlib_files() and len(files) > 100
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    bundle = prep(None, tmp_path, vocab_size=512, max_mb=0.2)
    assert bundle.source.startswith("Python ") and "standard library (0.2 MB" in bundle.source
    tok = load_tokenizer(bundle.tokenizer_path)
    assert "import" in tok.decode(bundle.train[:2000].tolist())


# ---- pre-tokenized .bin --------------------------------------------------------------


def test_bin_is_taken_as_is_and_split(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 97
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    bundle = prep(path, tmp_path, vocab_size=97, val_fraction=0.1)
    assert np.array_equal(bundle.train, ids[:900]) and np.array_equal(bundle.val, ids[900:])
    assert bundle.tokenizer_path is None and bundle.n_tokens == 1000
    assert not (tmp_path / "cache").exists()  # nothing tokenized, nothing cached
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(bundle.tokenizer_path)


def test_bin_uses_a_tokenizer_json_next_to_it(corpus_dir, tmp_path):
    text_bundle = prep(corpus_dir, tmp_path)
    folder = tmp_path / "pretok"
    folder.mkdir()
    np.concatenate([text_bundle.train, text_bundle.val]).tofile(folder / "data.bin")
    (folder / "tokenizer.json").write_bytes(text_bundle.tokenizer_path.read_bytes())
    bundle = prep(folder / "data.bin", tmp_path)
    assert bundle.tokenizer_path == folder / "tokenizer.json"
    assert np.array_equal(bundle.train, text_bundle.train)


@pytest.mark.parametrize("kind", ["text", "bin"])
def test_val_fraction_zero_holds_nothing_out(corpus_dir, tmp_path, kind):
    if kind == "bin":
        np.arange(300, dtype=np.uint16).tofile(tmp_path / "t.bin")
    bundle = prep(corpus_dir if kind == "text" else tmp_path / "t.bin", tmp_path, val_fraction=0.0)
    assert len(bundle.val) == 0 and len(bundle.train) == bundle.n_tokens > 0


def test_nanogpt_folder_with_train_and_val_bin(tmp_path):
    (np.arange(500, dtype=np.uint16) % 50).tofile(tmp_path / "train.bin")
    (np.arange(40, dtype=np.uint16)).tofile(tmp_path / "val.bin")
    bundle = prep(tmp_path, tmp_path, vocab_size=50)
    assert len(bundle.train) == 500 and list(bundle.val) == list(range(40))


def test_bin_ids_beyond_vocab_size_name_the_fix(tmp_path):
    np.array([1, 2, 300, 4], dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(UserError, match="raise model.vocab_size to at least 301"):
        prep(tmp_path / "t.bin", tmp_path, vocab_size=300)


# ---- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda d: d / "missing.txt", {}, "does not exist"),
        (lambda d: d / "missing.bin", {}, "does not exist"),
        (lambda d: put(d / "empty", None), {}, "holds no text"),
        (lambda d: put(d / "e.txt", ""), {}, "holds no text"),
        (lambda d: put(d / "b.dat", b"\xff\xfe\0\x01"), {}, "not UTF-8 text"),
        (lambda d: put(d / "tiny.txt", "a"), {}, "too few"),
        (lambda d: put(d / "odd.bin", b"\1\0\2"), {}, "not a flat uint16"),
        (lambda d: put(d / "zero.bin", b""), {}, "empty"),
        (lambda d: put(d / "t.txt", TEXT), {"vocab_size": 70000}, "at most 65535"),
        (lambda d: put(d / "t.txt", TEXT), {"vocab_size": 100}, "at least 257"),
        (lambda d: put(d / "t.txt", TEXT), {"val_fraction": 1.0}, "val_fraction"),
        (lambda d: put(d / "t.txt", TEXT), {"max_mb": -1}, "max_mb"),
    ],
)
def test_bad_data_input_raises_user_error(tmp_path, make, kwargs, message):
    path = make(tmp_path)
    with pytest.raises(UserError, match=message):
        prep(path, tmp_path, **kwargs)


def test_corrupt_tokenizer_file_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(UserError, match="not a valid"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")


# ---- sampler -------------------------------------------------------------------------

TOKENS = (np.arange(10_000) % 65_521).astype(np.uint16)  # token i sits at offset i: windows are easy to check


def test_batches_are_windows_with_next_token_targets():
    x, y = BatchSampler(TOKENS, seq_len=16, batch_size=4, seed=3).next()
    assert x.dtype == torch.int64 and x.shape == (4, 16) and y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows of the stream


def test_windows_reach_the_last_token_and_stay_in_range():
    tokens = np.arange(9, dtype=np.uint16)
    sampler = BatchSampler(tokens, seq_len=8, batch_size=2)  # exactly one possible window
    x, y = sampler.next()
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2
    sampler = BatchSampler(tokens, seq_len=4, batch_size=64)
    ys = torch.cat([sampler.next()[1] for _ in range(20)])
    assert int(ys.max()) == 8  # the last token is a target at some point, and never beyond


def test_sampler_is_deterministic_and_seed_dependent():
    a = [BatchSampler(TOKENS, 32, 8, seed=7).next()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = BatchSampler(TOKENS, 32, 8, seed=8).next()[0]
    assert not torch.equal(a[0], b)
    s = BatchSampler(TOKENS, 32, 8, seed=7)
    assert not torch.equal(s.next()[0], s.next()[0])  # steps differ


def test_state_dict_resume_gives_identical_batches():
    straight = BatchSampler(TOKENS, 32, 8, seed=5)
    expected = [straight.next() for _ in range(6)]
    first = BatchSampler(TOKENS, 32, 8, seed=5)
    for _ in range(3):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = BatchSampler(TOKENS, 32, 8, seed=0)
    resumed.load_state_dict(state)
    for x, y in expected[3:]:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_slices_concatenate_to_the_single_process_batch(dp_size):
    single = BatchSampler(TOKENS, 24, 8, seed=11)
    ranks = [BatchSampler(TOKENS, 24, 8, dp_rank=r, dp_size=dp_size, seed=11) for r in range(dp_size)]
    for _ in range(3):
        x, y = single.next()
        parts = [s.next() for s in ranks]
        assert all(p[0].shape == (8 // dp_size, 24) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_resume_under_a_different_dp_size_sees_the_same_global_batches():
    single = BatchSampler(TOKENS, 16, 4, seed=2)
    single.next()
    ranks = [BatchSampler(TOKENS, 16, 4, dp_rank=r, dp_size=2) for r in range(2)]
    for s in ranks:
        s.load_state_dict(single.state_dict())
    assert torch.equal(torch.cat([s.next()[0] for s in ranks]), single.next()[0])


def test_eval_batches_are_the_same_on_every_call():
    first = list(eval_batches(TOKENS, 16, 4, num_batches=3, seed=1))
    again = list(eval_batches(TOKENS, 16, 4, num_batches=3, seed=1))
    assert len(first) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    halves = [list(eval_batches(TOKENS, 16, 4, 3, dp_rank=r, dp_size=2, seed=1)) for r in range(2)]
    assert torch.equal(torch.cat([halves[0][0][0], halves[1][0][0]]), first[0][0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=6, dp_size=4), "does not divide over 4"),
        (dict(seq_len=10_000), "fewer than the 10001"),
        (dict(seq_len=0), "must be positive"),
        (dict(dp_rank=2, dp_size=2), "out of range"),
        (dict(seed=-1), "non-negative"),
    ],
)
def test_bad_sampler_input_raises_user_error(kwargs, message):
    args = dict(tokens=TOKENS, seq_len=8, batch_size=4) | kwargs
    with pytest.raises(UserError, match=message):
        BatchSampler(**args)


def test_bad_sampler_state_raises_user_error():
    with pytest.raises(UserError, match="not valid"):
        BatchSampler(TOKENS, 8, 4).load_state_dict({"step": "x"})


def test_sampler_over_a_prepared_split(corpus_dir, tmp_path):
    bundle = prep(corpus_dir, tmp_path)
    x, y = BatchSampler(bundle.train, 16, 4).next()
    assert int(x.max()) < bundle.vocab_size
    with pytest.raises(UserError, match="validation split"):
        next(eval_batches(bundle.val, len(bundle.val), 2, 1))


def test_concurrent_ranks_build_the_cache_once_and_agree(corpus_dir, tmp_path):
    """Two processes (as two ranks would) prepare the same corpus at once: both succeed, same shards."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from supercluster.data.prepare import prepare_data; "
        "b = prepare_data(sys.argv[1], 300, cache_dir=Path(sys.argv[2])); print(b.tokenizer_path.parent, b.n_tokens)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(corpus_dir), str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert outputs[0].split()[0] == str(prep(corpus_dir, tmp_path).tokenizer_path.parent)
