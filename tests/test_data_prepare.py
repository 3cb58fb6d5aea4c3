"""data prepare and prepared datasets: formats, dtypes, bad rows, interruption, mixtures, resume."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from supercluster.cli.main import main
from supercluster.cluster.isolation import JobArea, PathRefused, pin_paths
from supercluster.data.mixture import BLOCK, MixtureSampler, Split, open_prepared, quotas
from supercluster.data.pipeline import prepare
from supercluster.data.prepared import PreparedDataset, PreparedWriter, tokenizer_digest
from supercluster.errors import UserError

DOCS = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "naïve café — 東京 😀 Ωμέγα\t tabs\r\nCRLF line\n",
    "class Greeter:\n    def greet(self, name):\n        return f'hello {name}!'\n",
    "x" * 50 + "\n" + "y = [i * i for i in range(10)]\n",
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small byte-level BPE tokenizer trained on DOCS, saved as tokenizer.json."""
    from supercluster.data.tokenizer import save_tokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(DOCS * 20, 300), path)
    return path


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


# ---- the format ---------------------------------------------------------------------------


def test_uint32_round_trip_with_a_vocabulary_beyond_65535(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "big.json"
    tok_path.write_text(tokenizer.to_str())
    docs = ["w69999 w1 w65535 w65536", "w0 w42 w69998"]
    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    meta = prepare([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer=tok_path)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["documents"] == 2
    ds = PreparedDataset(tmp_path / "out", tokenizer_digest(tok_path))
    assert ds.tokens.dtype == np.uint32
    assert ds.doc(0).tolist() == [70_000, 2, 65_536, 65_537, 0]  # ids above 65,535 kept exactly, then the separator
    assert [tokenizer.decode(ds.doc(i)[:-1].tolist()) for i in range(2)] == docs
    assert (tmp_path / "out" / "tokens.bin").stat().st_size == 4 * meta["tokens"]


def test_every_input_format_gives_the_same_tokens(tmp_path, tokenizer_file):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    folder = tmp_path / "text"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    inputs = {"text": folder, "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
              "gz": write_jsonl(tmp_path / "d.jsonl.gz", rows, gzip.open)}
    inputs["zst"] = tmp_path / "d.jsonl.zst"
    inputs["zst"].write_bytes(zstandard.ZstdCompressor().compress(inputs["jsonl"].read_bytes()))
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    inputs["parquet"] = tmp_path / "d.parquet"
    pq.write_table(table, inputs["parquet"], row_group_size=2)  # several record batches
    datasets = pytest.importorskip("datasets")
    inputs["saved"] = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(inputs["saved"]))
    outputs = {}
    for name, path in inputs.items():
        prepare([path], tmp_path / f"out-{name}", tokenizer=tokenizer_file, workers=2 if name == "jsonl" else 1)
        out = tmp_path / f"out-{name}"
        outputs[name] = ((out / "tokens.bin").read_bytes(), (out / "docs.idx").read_bytes())
    assert len(set(outputs.values())) == 1, {k: len(v[0]) for k, v in outputs.items()}
    for name in inputs:  # digests taken while reading (JSON lines, text) or apart (Parquet, arrow): the files'
        for entry in json.loads((tmp_path / f"out-{name}" / "meta.json").read_text())["inputs"]:
            assert entry["sha256"] == hashlib.sha256(Path(entry["name"]).read_bytes()).hexdigest(), entry
    ds = PreparedDataset(tmp_path / "out-jsonl")
    assert len(ds) == len(DOCS) and ds.tokens.dtype == np.uint16
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    assert [tok.decode(ds.doc(i).tolist()) for i in range(len(ds))] == DOCS  # decode drops the separator
    meta = ds.meta
    assert meta["inputs"][0]["size"] == inputs["jsonl"].stat().st_size and len(meta["inputs"][0]["sha256"]) == 64


def test_a_text_file_larger_than_a_chunk_is_streamed_as_documents_cut_at_line_ends(tmp_path, tokenizer_file, monkeypatch):
    """A big text file never sits in memory whole: it becomes documents of about CHUNK_BYTES, each
    ending a line, that together are the file exactly; a small one stays one document; a file that
    turns binary part-way is one sentence."""
    from tokenizers import Tokenizer

    from supercluster.data import inputs

    monkeypatch.setattr(inputs, "CHUNK_BYTES", 256)
    text = "".join(DOCS) * 8  # about 1.9 KB, multi-byte characters across the cuts
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.txt").write_text(text, encoding="utf-8")
    (tmp_path / "in" / "small.txt").write_text("small one", encoding="utf-8")
    prepare([tmp_path / "in"], tmp_path / "out", tokenizer=tokenizer_file, workers=1)
    ds = PreparedDataset(tmp_path / "out")
    tok = Tokenizer.from_file(str(tokenizer_file))
    docs = [tok.decode(ds.doc(i).tolist()) for i in range(len(ds))]
    assert docs[-1] == "small one" and "".join(docs[:-1]) == text
    assert len(docs) - 1 >= len(text.encode()) // 256 - 2 and all(d.endswith("\n") for d in docs[:-2])
    (tmp_path / "in" / "small.txt").write_bytes(b"x\n" * 200 + b"\0binary tail")
    with pytest.raises(UserError, match="small.txt is UTF-8 text up to byte 256 and binary after it"):
        prepare([tmp_path / "in"], tmp_path / "out2", tokenizer=tokenizer_file, workers=1)
    assert not (tmp_path / "out2").exists()


def test_bad_rows_stop_with_one_sentence_and_skip_bad_counts_them(tmp_path, tokenizer_file, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", '{"text": unquoted', {"body": "x"}, {"text": 3}])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", str(bad), "--out", str(out), "--tokenizer", str(tokenizer_file)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}, line 3 is not valid JSON") and "--skip-bad" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == [bad]  # nothing written, not even a temporary folder
    main(["data", "prepare", str(bad), "--out", str(out), "--tokenizer", str(tokenizer_file), "--skip-bad", "--json"])
    meta = json.loads(capsys.readouterr().out)
    assert meta["skipped_bad"] == {"malformed_json": 1, "missing_field": 1, "not_text": 1}
    assert meta["documents"] == 1


def test_overwrite_replaces_a_prepared_dataset_and_nothing_else(tmp_path, tokenizer_file, capsys):
    """--overwrite once published over any --out (the input's own folder, a home): it now replaces
    only a prepared dataset; a folder, a file or a link (dangling too) is refused and left as it was."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in DOCS] + ["[" * 100_000])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (notes, src, dangling):
        with pytest.raises(SystemExit) as exit_:
            main(["data", "prepare", str(src), "--out", str(out), "--tokenizer", str(tokenizer_file), "--overwrite"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "not a prepared dataset" in err and "\n" not in err, err
    assert (notes / "keep.txt").read_text() == "mine" and dangling.is_symlink() and src.read_text().startswith("{")
    out = tmp_path / "ds"
    for _ in range(2):  # a prepared dataset is replaced; a row nested past Python's parser is a bad row, skipped
        meta = prepare([src], out, tokenizer=tokenizer_file, overwrite=True, skip_bad=True)
        assert meta["documents"] == len(DOCS) and meta["skipped_bad"]["malformed_json"] == 1


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_a_killed_prepare_leaves_nothing_a_run_trusts_and_can_be_run_again(tmp_path, tokenizer_file):
    """SIGKILL mid-prepare: no published folder, nothing trusted in the temporary one, and its workers
    end with it (a worker left blocked on half a task would hold the caller's pipes open for ever)."""
    line = json.dumps({"text": DOCS[0] * 40}) + "\n"
    big = tmp_path / "big.jsonl"
    big.write_text(line * (40_000_000 // len(line)))  # ~40 MB: seconds of tokenizing on one worker
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "supercluster.cli.main", "data", "prepare", str(big), "--out", str(out),
           "--tokenizer", str(tokenizer_file), "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    tmp = tmp_path / f"out.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    while not ((tmp / "tokens.bin").is_file() and (tmp / "tokens.bin").stat().st_size > 0):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = [pid for pid in _children(proc.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and tmp.is_dir() and not (tmp / "meta.json").exists()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived their killed parent"
        time.sleep(0.05)
    with pytest.raises(UserError, match="not a finished prepared dataset"):
        open_prepared(str(tmp), None, 0.0, 4096)
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": d} for d in DOCS])
    prepare([small], out, tokenizer=tokenizer_file)  # the same output again: the dead one's folder is cleared
    assert not tmp.exists() and PreparedDataset(out).n_documents == len(DOCS)


def test_a_run_refuses_a_dataset_of_another_tokenizer(tmp_path, tokenizer_file):
    with PreparedWriter(tmp_path / "a", 300, tokenizer_digest(tokenizer_file)) as w:
        w.add(np.arange(100) % 300)
        w.finish()
    with PreparedWriter(tmp_path / "b", 300, "0" * 64) as w:
        w.add(np.arange(100) % 300)
        w.finish()
    with pytest.raises(UserError, match="another tokenizer than this run's"):
        open_prepared(str(tmp_path / "a"), None, 0.0, 4096, "f" * 64)
    with pytest.raises(UserError, match="another tokenizer"):  # a mixture is one tokenizer's
        open_prepared(None, [{"path": str(tmp_path / "a"), "weight": 1}, {"path": str(tmp_path / "b"), "weight": 1}],
                      0.0, 4096)
    with pytest.raises(UserError, match="raise model.vocab_size"):
        open_prepared(str(tmp_path / "a"), None, 0.0, 256)


def test_chat_rows_get_a_loss_mask_on_the_assistant_turns(tmp_path, tokenizer_file):
    from tokenizers import Tokenizer

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    meta = prepare([write_jsonl(tmp_path / "c.jsonl", rows)], tmp_path / "out", fmt="chat", tokenizer=tokenizer_file)
    assert meta["loss_mask"] and meta["field"] == "messages"
    ds = PreparedDataset(tmp_path / "out")
    tok = Tokenizer.from_file(str(tokenizer_file))
    ids, mask = ds.doc(0).tolist(), ds.loss_mask(0).astype(bool)
    assert tok.decode(ids) == "user: hi\nassistant: hello there\n"
    assert tok.decode([t for t, m in zip(ids, mask) if m]).strip() == "hello there"


# ---- mixtures -----------------------------------------------------------------------------


def splits(sizes, seq_len):
    """Datasets whose token i of dataset d is d * 1_000_000 + i: every window says where it came from."""
    return [Split(np.arange(n * seq_len + 1, dtype=np.int64) + d * 1_000_000, None, f"d{d}") for d, n in enumerate(sizes)]


def drawn(sampler, steps):
    """(dataset, sample) of every sample of `steps` global batches, from the rows' first token."""
    out = []
    for _ in range(steps):
        x, _ = sampler.next()
        out += [(int(t) // 1_000_000, int(t) % 1_000_000 // sampler.seq_len) for t in x[:, 0]]
    return out


def test_mixture_proportions_hold_and_each_epoch_visits_every_sample_once():
    weights = [0.5, 0.3, 0.2]
    sampler = MixtureSampler(splits([500, 300, 7], 8), weights, 8, 64)
    seen = drawn(sampler, 200)  # 12,800 samples
    counts = np.bincount([d for d, _ in seen], minlength=3) / len(seen)
    assert np.allclose(counts, weights, atol=0.01), counts
    assert quotas(weights).sum() == BLOCK
    first = [k for d, k in seen if d == 0][:500]
    assert sorted(first) == list(range(500))  # an epoch is a permutation of the dataset's samples
    again = [k for d, k in seen if d == 0][500:1000]
    assert sorted(again) == list(range(500)) and again != first  # the next epoch in another order


def test_resume_is_bit_exact_in_the_middle_of_an_epoch(capsys):
    data, seq = splits([300, 200], 16), 16
    straight = MixtureSampler(data, [2, 1], seq, 8, seed=3)
    batches = [straight.next() for _ in range(7)]
    first = MixtureSampler(data, [2, 1], seq, 8, seed=3)
    for _ in range(3):
        first.next()
    resumed = MixtureSampler(data, [2, 1], seq, 8, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through a checkpoint's JSON
    for x, y in batches[3:]:
        rx, ry = resumed.next()
        assert np.array_equal(rx, x) and np.array_equal(ry, y)
    assert capsys.readouterr().err == ""  # the same mixture resumes silently
    annealed = MixtureSampler(data, [1, 1], seq, 8)  # new weights: the count goes on, and it says so
    annealed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert annealed.consumed == first.consumed
    assert "Resuming on another mixture than the checkpoint's" in capsys.readouterr().err


def test_resume_from_dp4_at_dp2_sees_each_sample_once():
    data, seq, batch = splits([96, 64], 4), 4, 8  # 160 samples: 20 steps make one pass at these weights
    reference = drawn(MixtureSampler(data, [96, 64], seq, batch), 12)
    dp4 = [MixtureSampler(data, [96, 64], seq, batch, rank, 4) for rank in range(4)]
    seen = []
    for _ in range(5):
        seen += [s for sampler in dp4 for s in drawn(sampler, 1)]
    state = dp4[0].state_dict()
    assert all(s.state_dict() == state for s in dp4)  # one global state, whichever rank wrote it
    dp2 = [MixtureSampler(data, [96, 64], seq, batch, rank, 2) for rank in range(2)]
    for sampler in dp2:
        sampler.load_state_dict(state)
    for _ in range(7):
        seen += [s for sampler in dp2 for s in drawn(sampler, 1)]
    assert seen == reference
    assert len(set(seen)) == len(seen)  # within one pass, no sample twice


def test_labels_from_a_loss_mask_are_ignored_targets():
    tokens = np.arange(17, dtype=np.uint16)
    mask = (np.arange(17) % 2).astype(np.uint8)
    sampler = MixtureSampler([Split(tokens, mask, "chat")], [1.0], 16, 1)
    x, y = sampler.next()
    assert x.tolist()[0] == list(range(16))
    assert y.tolist()[0] == [t if t % 2 else -100 for t in range(1, 17)]


def test_mix_paths_are_checked_and_pinned_by_isolation(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[data]\nmix = [{path = "sets/a", weight = 2.0}, {path = "sets/b", weight = 1.0}]\n')
    pinned = pin_paths(config, [], JobArea(base=tmp_path, readable=(tmp_path,)))
    from supercluster.train.config import load_config

    mix = load_config(config, pinned).data.mix
    assert mix == [{"path": str(tmp_path / "sets/a"), "weight": 2.0}, {"path": str(tmp_path / "sets/b"), "weight": 1.0}]
    with pytest.raises(PathRefused, match=r"data.mix\[1\].path"):
        pin_paths(config, ['data.mix=[{path="sets/a", weight=1}, {path="../../etc", weight=1}]'],
                  JobArea(base=tmp_path, readable=(tmp_path,)))
    with pytest.raises(UserError, match="which a mixture does not read"):
        pin_paths(config, ['data.mix=[{path="a", wieght=1}]'], JobArea(base=tmp_path))


def test_a_short_run_trains_on_a_mixture_and_resumes_its_position(tmp_path, tokenizer_file):
    for name in ("a", "b"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {d}"} for d in DOCS * 30])
        prepare([tmp_path / f"{name}.jsonl"], tmp_path / name, tokenizer=tokenizer_file)
    run = tmp_path / "run"
    common = ["train", "--no-sample", "--json", "--set", "model.preset=tiny", "--set", "train.seq_len=16",
              "--set", "train.global_batch=4", "--set", "train.micro_batch=4", "--set", "train.eval_every=2",
              "--set", f'data.mix=[{{path="{tmp_path / "a"}", weight=3}}, {{path="{tmp_path / "b"}", weight=1}}]',
              "--set", f"run.dir={run}", "--set", "train.checkpoint_every=2"]
    main(common + ["--set", "train.steps=2"])
    # the third step at twice the batch: resumed, 2*4 + 8 samples consumed (a fresh run's would be 3*8)
    main(common + ["--set", "train.steps=3", "--set", "train.global_batch=8", "--set", "train.micro_batch=8"])
    state = json.loads(next((run / "checkpoints").glob("*3*/train_state.json")).read_text())
    assert state["sampler"]["consumed"] == 16
    assert (run / "tokenizer.json").is_file()
    assert tokenizer_digest(run / "tokenizer.json") == tokenizer_digest(tokenizer_file)


# ---- the pipeline: raw blocks, digests while reading, jemalloc in the workers ----------------


def test_blocks_cut_at_line_ends_give_the_same_dataset_at_any_block_size_and_worker_count(tmp_path, tokenizer_file,
                                                                                       monkeypatch):
    """JSON lines reach the workers as blocks cut at line ends: tiny blocks (every line longer than
    one), blank lines, a last line without its newline, gz, 1 or 2 workers: the same bytes, the
    digest taken while reading is the file's, and a bad row is still named by its own line."""
    import hashlib

    from supercluster.data import inputs

    rows = [json.dumps({"text": d}) for d in DOCS * 5]
    rows[3:3] = ["", "   "]  # blank lines are not rows, but count as lines
    text = "\n".join(rows)  # no newline after the last row
    plain = tmp_path / "in.jsonl"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    outputs = set()
    for block, workers, src in ((inputs.CHUNK_BYTES, 1, plain), (64, 1, plain), (64, 2, plain), (7, 2, packed)):
        monkeypatch.setattr(inputs, "CHUNK_BYTES", block)
        out = tmp_path / f"out-{block}-{workers}-{src.suffix}"
        meta = prepare([src], out, tokenizer=tokenizer_file, workers=workers)
        assert meta["documents"] == len(DOCS) * 5
        assert meta["inputs"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        outputs.add(((out / "tokens.bin").read_bytes(), (out / "docs.idx").read_bytes()))
    assert len(outputs) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows[:10] + ['{"text": unquoted'] + rows[11:]), encoding="utf-8")  # still 7-byte blocks
    with pytest.raises(UserError, match=rf"^{bad}, line 11 is not valid JSON"):
        prepare([bad], tmp_path / "out-bad", tokenizer=tokenizer_file, workers=2)


def test_jemalloc_is_preloaded_into_workers_only_and_its_absence_falls_back(tmp_path, tokenizer_file, monkeypatch):
    from supercluster.data import pipeline

    monkeypatch.setattr(pipeline, "JEMALLOC_PATHS", (str(tmp_path / "libjemalloc.so.2"),))  # not there
    monkeypatch.delenv("SUPERCLUSTER_JEMALLOC", raising=False)
    assert pipeline.jemalloc_path() is None
    monkeypatch.setenv("SUPERCLUSTER_JEMALLOC", str(tmp_path / "nowhere.so"))
    assert pipeline.jemalloc_path() is None
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in DOCS])
    meta = prepare([src], tmp_path / "out", tokenizer=tokenizer_file, workers=2)  # the normal allocator, silently
    assert meta["documents"] == len(DOCS)
    monkeypatch.setenv("SUPERCLUSTER_JEMALLOC", "0")
    monkeypatch.setattr(pipeline, "JEMALLOC_PATHS", (sys.executable,))  # a file that exists: still off
    assert pipeline.jemalloc_path() is None
    monkeypatch.undo()
    library = pipeline.jemalloc_path()
    if library is None:
        pytest.skip("no libjemalloc.so.2 on this machine (apt-get install libjemalloc2)")
    before = os.environ.get("LD_PRELOAD")
    recipe = pipeline.Recipe(Path(tokenizer_file).read_text(), "text", "text", 0, None, "", "", "uint16")
    pool = pipeline.WorkerPool(1, recipe)
    try:
        # start() returns once the worker is forked, its exec perhaps still under way: read its
        # mappings once it has loaded the tokenizer (the preload is mapped before its first import)
        maps, deadline = "", time.monotonic() + 60
        while "tokenizers" not in maps and time.monotonic() < deadline:
            time.sleep(0.05)
            maps = Path(f"/proc/{pool.procs[0].pid}/maps").read_text()
    finally:
        pool.close()
    assert "libjemalloc" in maps and os.environ.get("LD_PRELOAD") == before  # the parent's own environment is untouched
