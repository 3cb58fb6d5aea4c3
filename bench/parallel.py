"""Tokens/s of each parallel layout at 1, 2 and 4 ranks, against the single-process trainer
measured in the same run, and the bytes each collective kind moves per step.

Every layout is a real `supercluster train` job (torchrun, gloo on CPU) on the same model,
batch and data; its throughput is the median over the steps after warm-up (the step whose
collectives are counted is left out: counting slows it). Bytes are per rank 0 and summed
over the world, for one step: the full size of the tensor each collective works on (the
gathered output of an all-gather, the input of a reduce-scatter, an all-reduce's buffer, a
send's tensor), which the planner's communication model can turn into wire bytes.

    .venv/bin/python bench/parallel.py [--preset small] [--steps 8] [--layouts fsdp2,dp2tp2] [--json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> (ranks, config overrides)
LAYOUTS = {
    "single": (1, []),
    "fsdp2": (2, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "pp2-gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2-interleaved": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved1f1b", "parallel.virtual_stages=2"]),
    "pp2-zbv": (2, ["parallel.pp=2", "parallel.pp_schedule=zbvzerobubble"]),
    "cp2": (2, ["parallel.cp=2"]),
    "fsdp4": (4, []),
    "hsdp2x2": (4, ["parallel.dp_replicate=2"]),
    "dp2-tp2": (4, ["parallel.tp=2"]),
    "pp2-dp2": (4, ["parallel.pp=2"]),
    "tp2-pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "dp2-cp2": (4, ["parallel.cp=2"]),
}


def run_layout(name: str, args, root: Path) -> dict:
    nproc, extra = LAYOUTS[name]
    run_dir = root / name
    sets = [f"model.preset={args.preset}", "model.layers=4", "model.tie_embeddings=false", f"train.seq_len={args.seq_len}",
            f"train.micro_batch={args.micro_batch}", f"train.global_batch={args.global_batch}", f"train.steps={args.steps}",
            "train.precision=fp32", "train.eval_every=0", "train.checkpoint_every=0", f"run.dir={run_dir}", *extra]
    if args.corpus:
        sets.append(f"data.path={args.corpus}")
    cmd = [sys.executable, "-m", "supercluster.cli.main", "train", "--nproc", str(nproc), "--no-sample", "--json",
           *[f"--set={s}" for s in sets]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return {"layout": name, "ranks": nproc, "error": result.stderr.strip().splitlines()[-1][:200]}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records[args.warmup:] if not r.get("comm_measured")] or records[-1:]
    counted = next((r for r in records if r.get("comm_measured")), {})
    return {"layout": name, "ranks": nproc, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed), "loss": records[-1]["loss"],
            "comm_bytes_rank0": counted.get("comm_bytes", {}), "comm_calls_rank0": counted.get("comm_calls", {}),
            "comm_bytes_world": counted.get("comm_bytes_world", {})}


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--corpus", default=None, help="text to train on (default: the stdlib corpus)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from {', '.join(LAYOUTS)}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = ["single"] + [n for n in args.layouts.split(",") if n and n != "single"]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        sys.exit(f"unknown layouts {unknown}; choose from {', '.join(LAYOUTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run_layout(name, args, Path(tmp)))
            if not args.json:
                print(f"... {name} done", file=sys.stderr, flush=True)
    base = rows[0].get("tokens_per_s")
    for row in rows:
        if "tokens_per_s" in row and base:
            row["ratio_vs_single"] = row["tokens_per_s"] / base
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "preset": args.preset, "rows": rows}, indent=1))
        return
    print(f"model {args.preset} (4 layers), seq {args.seq_len}, global batch {args.global_batch}, "
          f"{os.cpu_count()} cores; reference: the single-process trainer, same run")
    print(f"{'layout':16s} {'ranks':>5s} {'tokens/s':>10s} {'vs single':>9s} {'loss':>7s}   "
          f"MiB per step, rank 0 (world): all_gather  reduce_scatter  all_reduce  send/recv")
    for r in rows:
        if "error" in r:
            print(f"{r['layout']:16s} {r['ranks']:5d}  failed: {r['error']}")
            continue
        b, w = r["comm_bytes_rank0"], r["comm_bytes_world"]
        cols = []
        for kind in ("all_gather", "reduce_scatter", "all_reduce"):
            cols.append(f"{mib(b.get(kind, 0))} ({mib(w.get(kind, 0))})")
        cols.append(f"{mib(b.get('send', 0) + b.get('recv', 0))} ({mib(w.get('send', 0) + w.get('recv', 0))})")
        print(f"{r['layout']:16s} {r['ranks']:5d} {r['tokens_per_s']:10,.0f} {r['ratio_vs_single']:9.2f} "
              f"{r['loss']:7.4f}   " + "  ".join(cols))


if __name__ == "__main__":
    main()
