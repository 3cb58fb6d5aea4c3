"""Structured output's cost end to end: output tokens/s with a JSON Schema against free text,
at 1 and 8 concurrent streams, on one `supercluster serve` of RUN_DIR, in the same run.

Each level sends `--requests` chat completions (at most that level in flight): free ones with
`ignore_eos` and `max_tokens`, constrained ones with a JSON Schema `response_format` (they end
when the document does, so tokens/s, not requests/s, is compared). Goal: constrained >= 0.9x
free. The per-token cost of the mask itself is `bench/structured_mask.py`'s, run after.

    .venv/bin/python bench/structured.py RUN_DIR [--levels 1,8] [--requests 16] [--max-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve import free_port
from structured_mask import SUITE, measure_xgrammar

SCHEMA = SUITE["order"][0]


def start(run_dir: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("supercluster")), "serve", str(run_dir), "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def level(url: str, model: str, streams: int, requests: int, max_tokens: int, constrained: bool) -> dict:
    def one(i: int) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": f"Write order number {i} as JSON."}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": i}
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA, "strict": True}}
        else:
            body["ignore_eos"] = True
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        out = r.json()
        if constrained and out["choices"][0]["finish_reason"] == "stop":
            json.loads(out["choices"][0]["message"]["content"])  # it parses, or the bench stops here
        return out["usage"]["completion_tokens"]

    one(requests)  # warm-up (compiles the schema once)
    start_t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(one, range(requests)))
    wall = time.perf_counter() - start_t
    return {"streams": streams, "constrained": constrained, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    proc, url = start(args.run_dir, args.threads)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        rows = []
        for streams in map(int, args.levels.split(",")):
            free = level(url, model, streams, args.requests, args.max_tokens, False)
            schema = level(url, model, streams, args.requests, args.max_tokens, True)
            rows.append({"streams": streams, "free": free, "json_schema": schema,
                         "ratio": round(schema["tokens_per_s"] / free["tokens_per_s"], 3)})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = {"load_average": os.getloadavg(), "levels": rows, "mask": measure_xgrammar(args.run_dir, 5)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"load average {report['load_average'][0]:.1f}")
    for r in rows:
        print(f"{r['streams']:3} streams: free {r['free']['tokens_per_s']:8.1f} tok/s   json_schema "
              f"{r['json_schema']['tokens_per_s']:8.1f} tok/s   ratio {r['ratio']:.2f} (goal >= 0.9)")
    for name, s in report["mask"]["schemas"].items():
        print(f"mask {name:8} p50 {s['mask_us_p50']:7.2f} us/token   compile {s['compile_ms']:.1f} ms")


if __name__ == "__main__":
    main()
