"""Decode throughput of the serving engine at tensor parallelism 1 and 2 (or --tp), CPU ranks.

Each trial starts an engine (fp32 unless --precision says otherwise), warms it with one short
request, then submits --requests prompts at once, each asking for --tokens tokens with
`ignore_eos`. Decode tokens/s counts the tokens that arrive after every request has its first
token (all prefills done) over the time from then to the last token. Trials of the tp values
alternate, --repeats rounds, so drifting load on the machine hits them alike; the report gives
each value's median and its ratio to tp 1.

The default model is SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 49,152-token
vocabulary) with 8 heads and 4 key/value heads instead of 9 and 3, which 2 ranks cannot split,
and random weights (the speed does not depend on them); its tokenizer comes from the run
directory `supercluster import smollm2` made (--smollm2, default /tmp/smollm2). --run measures
any other run directory instead.

    .venv/bin/python bench/serve_tp.py [--tp 1,2] [--requests 4] [--tokens 48] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import time
from pathlib import Path

from supercluster.hardware.local import cpu_model

PROMPT = "The history of the river and the mountain, told by the people of the valley, begins"


def splittable_smollm2(smollm2: Path, out: Path) -> Path:
    """SmolLM2-135M's shape with 8 heads / 4 KV heads and random weights, as a run directory."""
    import torch

    from supercluster.model.transformer import Transformer
    from supercluster.model.weights import WEIGHTS_FILE, save_weights, stored_names
    from supercluster.train.config import load_config

    if (out / WEIGHTS_FILE).is_file():
        return out
    if not (smollm2 / "tokenizer.json").is_file():
        raise SystemExit(f"{smollm2} has no tokenizer.json; run `supercluster import smollm2 --out {smollm2}` first.")
    cfg = load_config(smollm2 / "config.toml")
    cfg.model.heads, cfg.model.kv_heads = 8, 4
    cfg.run.dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.toml")
    for name in ("tokenizer.json", "special_tokens.json"):
        shutil.copy(smollm2 / name, out / name)
    torch.manual_seed(0)
    model = Transformer(cfg.model_config())
    state = model.state_dict()
    save_weights({k: state[k] for k in stored_names(model)}, out / WEIGHTS_FILE)
    return out


def trial(run_dir: Path, tp: int, requests: int, tokens: int, precision: str) -> dict:
    from supercluster.serve.engine import Engine, EngineConfig
    from supercluster.serve.sampling import SamplingParams

    engine = Engine(run_dir, EngineConfig(tp=tp, precision=precision, kv_cache_gib=0.25))
    try:
        def submit(prompt: str, n: int) -> queue.Queue:
            events: queue.Queue = queue.Queue()
            engine.submit(engine.tokenizer.encode(prompt).ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                          lambda e: events.put((time.perf_counter(), e)))
            return events

        def arrivals(events: queue.Queue) -> list[float]:
            times = []
            while True:
                at, event = events.get(timeout=600)
                if "error" in event:
                    raise RuntimeError(event["error"])
                if "finish_reason" in event:
                    return times
                times.append(at)

        arrivals(submit(PROMPT, 4))  # warm-up
        streams = [submit(f"{i}: {PROMPT}", tokens) for i in range(requests)]
        times = [arrivals(s) for s in streams]
    finally:
        engine.shutdown()
    prefilled = max(t[0] for t in times)
    decoded = sum(1 for t in times for at in t if at > prefilled)
    return {"tp": tp, "decode_tokens_per_s": decoded / (max(t[-1] for t in times) - prefilled)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="A run directory to measure instead of the SmolLM2-shaped model.")
    parser.add_argument("--smollm2", type=Path, default=Path("/tmp/smollm2"))
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = Path(os.environ.get("SUPERCLUSTER_HOME", Path.home() / ".supercluster"))
    run_dir = args.run or splittable_smollm2(args.smollm2, home / "bench" / "smollm2-shape-8-heads")
    tps = [int(t) for t in args.tp.split(",")]
    load_before = os.getloadavg()[0]
    rates: dict[int, list[float]] = {tp: [] for tp in tps}
    for _ in range(args.repeats):
        for tp in tps:
            rates[tp].append(trial(run_dir, tp, args.requests, args.tokens, args.precision)["decode_tokens_per_s"])
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": [load_before, os.getloadavg()[0]],
              "model": str(run_dir), "requests": args.requests, "tokens": args.tokens, "precision": args.precision,
              "decode_tokens_per_s": {tp: statistics.median(r) for tp, r in rates.items()},
              "trials": rates}
    base = report["decode_tokens_per_s"][tps[0]]
    report["ratio_to_first"] = {tp: v / base for tp, v in report["decode_tokens_per_s"].items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['cpu']}, {report['cores']} cores, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{run_dir.name}: {args.requests} requests x {args.tokens} tokens, {args.precision}")
    for tp in tps:
        trials = ", ".join(f"{r:.1f}" for r in rates[tp])
        print(f"  tp {tp}: {report['decode_tokens_per_s'][tp]:.1f} decode tokens/s (median of {trials}), "
              f"x{report['ratio_to_first'][tp]:.2f}")


if __name__ == "__main__":
    main()
