"""`supercluster serve` (the OpenAI-compatible server) and `supercluster chat` (a terminal chat)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from supercluster.cli.flags import listen, real
from supercluster.errors import UserError
from supercluster.limits import MAX_NEW_TOKENS, MAX_TEMPERATURE
from supercluster.serve.config import EngineConfig
from supercluster.serve.quantizations import DEFAULT as DEFAULT_QUANTIZATION
from supercluster.serve.quantizations import help_text as quantization_help

RunDir = Annotated[Path, typer.Argument(help="A run directory: trained here, or made by `supercluster import`.")]


def _config(run_dir: Path, threads: int | None, **flags) -> EngineConfig:
    """The engine's flags, checked before PyTorch or the model loads (a mistyped flag fails at once)."""
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.toml); train or import a model into it first.")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}.")
    return EngineConfig(**flags).check()


def _engine(run_dir: Path, config: EngineConfig, threads: int | None):
    import torch

    from supercluster.serve.engine import Engine

    if threads is not None:
        torch.set_num_threads(threads)
    return Engine(run_dir, config)


def serve(
    run_dir: RunDir,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    api_key: Annotated[Optional[list[str]], typer.Option("--api-key", help="A key clients send as Bearer (repeatable); none: open.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option("--api-key-file", help="A file of keys, one a line (kept out of the process list).")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Waiting requests beyond which new ones get 429.")] = 256,
    max_running: Annotated[int, typer.Option("--max-running", min=1, help="Sequences decoding at once.")] = 32,
    kv_cache_gib: Annotated[float, typer.Option("--kv-cache-gib", callback=real(0, low_open=True), help="Memory for the paged KV cache.")] = 0.5,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 where it runs this model faster), fp32 or bf16.")] = "auto",
    quantize: Annotated[str, typer.Option("--quantize", help=quantization_help() + " int4 kernels are C++, built at "
                                          "first use.")] = DEFAULT_QUANTIZATION,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for the model (default: all cores).")] = None,
    tp: Annotated[int, typer.Option("--tp", help="Split the model tensor-parallel over this many CPU processes (they share --kv-cache-gib).")] = 1,
    speculate: Annotated[int, typer.Option("--speculate", help="Speculative decoding for greedy (temperature 0) requests: "
                                           "up to this many draft tokens a step, found by matching the sequence's last "
                                           "tokens against its earlier text (prompt lookup), verified in the same step; "
                                           "output unchanged. Speeds up quoting, rewriting and extraction. 0: off.")] = 0,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="The model's id in the API (default: the run directory's name).")] = None,
):
    """Serve a model behind an OpenAI-compatible API, with continuous batching and a paged KV cache."""
    # The model's idle OpenMP threads sleep instead of spinning between steps: the HTTP server
    # shares their cores (set before PyTorch loads, which is when OpenMP reads it). An int4 step is
    # one C++ call of back-to-back parallel kernels: there the threads spin briefly (about a tenth
    # of a millisecond, libgomp's GOMP_SPINCOUNT) before they sleep, so they stay awake from one
    # kernel to the next but not between steps. Measured with bench/serve.py on a 2-core Zen 4:
    # 16 streams 5-10% faster than sleeping at once; fp32 steps, with Python between their
    # kernels, were not faster.
    if quantize in ("auto", "int4", "int4-q8act") and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    config = _config(run_dir, threads, kv_cache_gib=kv_cache_gib, max_running=max_running, max_queue=max_queue,
                     precision=precision, quantize=quantize, tp=tp, speculate=speculate)
    keys = list(api_key or [])
    if api_key_file is not None:
        try:
            keys += [line.strip() for line in api_key_file.read_text().splitlines() if line.strip()]
        except OSError as err:
            raise UserError(f"Cannot read --api-key-file {str(api_key_file)!r} ({err.strerror}); pass a readable file.") from None
        if not keys:
            raise UserError(f"--api-key-file {str(api_key_file)!r} holds no key; write one a line.")
    if served_model_name is not None and not served_model_name.strip():
        raise UserError("--served-model-name is empty; give the id clients should send as `model`.")
    sock = listen(host, port)  # before the model loads: a busy port fails in a second
    import uvicorn

    from supercluster.serve.api import create_app

    engine = _engine(run_dir, config, threads)
    try:
        engine.name = served_model_name or engine.name
        app = create_app(engine, keys, max_queue)
        print(f"serving {engine.name} on http://{host}:{sock.getsockname()[1]}/v1 ({engine.describe_precision()}, tp {tp}, "
              f"{engine.cache.pool.num_blocks} KV blocks of {engine.config.block_size} tokens)", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        engine.shutdown()


def chat(
    run_dir: RunDir,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, max=MAX_NEW_TOKENS)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", callback=real(0, MAX_TEMPERATURE), help="0 is greedy.")] = 0.7,
):
    """Chat with a model in the terminal (streaming; the model's own chat template)."""
    import queue

    from supercluster.serve.sampling import SamplingParams

    engine = _engine(run_dir, _config(run_dir, None, kv_cache_gib=0.25, max_running=1, max_queue=1), None)
    messages = []
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            prompt = engine.tokenizer.encode(engine.chat.render(messages), add_special_tokens=False).ids
            budget = min(max_tokens, engine.max_len - len(prompt))
            if budget < 1:
                print("(the conversation is as long as the model's context; start a new chat)")
                messages.clear()
                continue
            events: queue.Queue = queue.Queue()
            engine.submit(prompt, SamplingParams(max_tokens=budget, temperature=temperature), events.put)
            reply, event = "", {}
            print("model> ", end="", flush=True)
            while "finish_reason" not in event and "error" not in event:
                event = events.get()
                reply += event.get("text", "")
                print(event.get("text", ""), end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": reply})
    finally:
        engine.shutdown()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("chat")(chat)
