"""An endpoint with 2 replicas against 1 on this machine, and the router's added latency.

A real `supercluster server` (one worker) on a fresh SQLite file and a local fleet; one project
serves a model (a run in the model library: --run-dir, default a tiny model trained here for a
few steps) through an endpoint of 1 replica, then through one of 2 replicas (min = max, so the
scaler leaves them be). For each, STREAMS concurrent callers (8 and 16) loop over completions of
--max-tokens tokens for --seconds: the endpoint's output tokens per second.
Then the router's added latency: the same one-token completion, one at a time, --requests times
through the service and straight to the model server (with its key), p50 and p99 of each and
their difference.

    .venv/bin/python bench/endpoint_replicas.py [--run-dir NAME] [--seconds 20] [--max-tokens 32] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from supercluster.hardware.local import cpu_model


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(db: Path) -> str:
    """The service's operator and a member's token of project `bench`, and a local fleet."""
    from fastapi.testclient import TestClient

    from supercluster.cluster.fleet import init_fleet
    from supercluster.service import tenancy
    from supercluster.service.app import create_app
    from supercluster.service.store import Store

    store = Store(f"sqlite:///{db}")
    with store.session() as s:
        op = {"Authorization": f"Bearer {tenancy.init_operator(s)}"}
    init_fleet(store.fleet, "local", gpus=2)
    with TestClient(create_app(store=store)) as c:
        c.post("/v1/orgs", headers=op, json={"name": "bench"}).raise_for_status()
        c.post("/v1/orgs/bench/projects", headers=op, json={"name": "bench"}).raise_for_status()
        c.post("/v1/users", headers=op, json={"name": "bench", "org": "bench"}).raise_for_status()
        token = c.post("/v1/tokens", headers=op, json={"user": "bench", "project": "bench", "role": "member"}).json()["token"]
    store.dispose()
    return token


def tiny_model(home: Path) -> str:
    run = home / "models" / "bench-tiny"
    if not (run / "config.toml").is_file():
        corpus = Path(tempfile.mkdtemp()) / "corpus.txt"
        corpus.write_text("".join(Path(p).read_text() for p in sorted(Path("src/supercluster").rglob("*.py"))[:60]))
        subprocess.run([sys.executable, "-m", "supercluster.cli.main", "train", "configs/tiny.toml", "--set",
                        f"run.dir={run}", "--set", f"data.path={corpus}", "--set", "train.steps=2", "--set",
                        "train.eval_every=0", "--no-sample"], check=True, capture_output=True)
    return run.name


def deploy(c: httpx.Client, auth: dict, name: str, run_dir: str, replicas: int) -> None:
    r = c.post("/v1/projects/bench/endpoints", headers=auth, json={
        "name": name, "cluster": "here", "run_dir": run_dir, "min_replicas": replicas, "max_replicas": replicas})
    r.raise_for_status()
    deadline = time.monotonic() + 900
    while True:
        e = c.get(f"/v1/projects/bench/endpoints/{name}", headers=auth).json()
        if sum(s["state"] == "ready" for s in e["servers"]) == replicas:
            return
        if e["state"] == "failed" or time.monotonic() > deadline:
            raise SystemExit(f"endpoint {name} did not start: {e}")
        time.sleep(1)


async def throughput(url: str, auth: dict, model: str, streams: int, seconds: float, max_tokens: int) -> float:
    tokens, stop = 0, time.monotonic() + seconds

    async def caller(i: int) -> None:
        nonlocal tokens
        n = 0
        async with httpx.AsyncClient(timeout=600) as c:
            while time.monotonic() < stop:
                n += 1
                r = await c.post(f"{url}/completions", headers=auth, json={
                    "model": model, "prompt": f"def f{i}_{n}(x):", "max_tokens": max_tokens, "temperature": 0})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

    start = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(streams)))
    return tokens / (time.monotonic() - start)


def latencies(url: str, auth: dict, model: str, requests: int) -> list[float]:
    out = []
    with httpx.Client(timeout=60) as c:
        for i in range(requests + 10):
            t = time.perf_counter()
            c.post(f"{url}/completions", headers=auth, json={"model": model, "prompt": "x", "max_tokens": 1}).raise_for_status()
            if i >= 10:  # the first few warm the connections
                out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="a run in the model library ($SUPERCLUSTER_HOME/models)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    os.environ.setdefault("SUPERCLUSTER_HOME", str(work / "home"))
    home = Path(os.environ["SUPERCLUSTER_HOME"])
    run_dir = args.run_dir or tiny_model(home)
    db = work / "service.db"
    token = prepare(db)
    port = _port()
    server = subprocess.Popen([sys.executable, "-m", "supercluster.cli.main", "server", "--port", str(port), "--db",
                               f"sqlite:///{db}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            while True:
                try:
                    c.get("/v1/fleet", headers=auth)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            c.post("/v1/projects/bench/clusters", headers=auth, json={"name": "here", "gpus": 2}).raise_for_status()
            rows = {}
            for name, replicas in (("one", 1), ("two", 2)):
                deploy(c, auth, name, run_dir, replicas)
                url = f"{base}/v1/projects/bench/endpoints/{name}/v1"
                asyncio.run(throughput(url, auth, name, 4, 3, args.max_tokens))  # warm-up
                rows[name] = {s: asyncio.run(throughput(url, auth, name, s, args.seconds, args.max_tokens)) for s in (8, 16)}
                if name == "one":  # the router's cost: through the service against straight to the server
                    with sqlite3.connect(db) as conn:
                        secret = conn.execute("SELECT secret FROM svc_endpoints WHERE name = 'one'").fetchone()[0]
                        direct = conn.execute("SELECT url FROM svc_endpoint_replicas WHERE state = 'ready'").fetchone()[0]
                    via = latencies(url, auth, name, args.requests)
                    straight = latencies(f"{direct}/v1", {"Authorization": f"Bearer {secret}"}, name, args.requests)
                c.delete(f"/v1/projects/bench/endpoints/{name}", headers=auth)
        print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
        print(f"model {run_dir}, {args.max_tokens} tokens a completion, {args.seconds:.0f} s a point")
        for s in (8, 16):
            one, two = rows["one"][s], rows["two"][s]
            print(f"{s:>2} streams: 1 replica {one:7.1f} tok/s, 2 replicas {two:7.1f} tok/s ({two / one:.2f}x)")
        for label, xs in (("through the service", via), ("straight to the server", straight)):
            print(f"one-token completion {label:>24}: p50 {pct(xs, 50):6.1f} ms, p99 {pct(xs, 99):6.1f} ms")
        print(f"router's added latency: p50 {pct(via, 50) - pct(straight, 50):.1f} ms, p99 {pct(via, 99) - pct(straight, 99):.1f} ms")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
