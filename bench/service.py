"""The service under load: 200 concurrent API clients for 30 s on loopback (bounded).

A real `supercluster server` process on a fresh database (a new SQLite file by default, or a
schema of its own on the server at --db URL, dropped at the end) over a simulated fleet; each
client has its own token in one of 4 projects and loops over a mix of routes: list and create
clusters (8 GPUs, a unique name), delete one of its own, read the quota, usage and fleet. At
the end it checks that no answer was a 5xx and that no cluster record was lost or duplicated
(every 202 not deleted since is listed exactly once, every 200 delete is gone), and prints p50/p99
latency per route and the CPU time per request of the server and of the clients (which run on the
same cores, in this process). It runs the server with one worker
process and then with --workers (default: this machine's cores), each on a fresh database, in the
same minute, and prints both.

    .venv/bin/python bench/service.py [--clients 200] [--seconds 30] [--db URL] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

import httpx

from supercluster.hardware.local import cpu_model
from placement import fresh_db  # bench/placement.py, beside this file

PROJECTS = 4
SPEC = {"gpu_type": "h100", "nodes": 256, "gpus_per_node": 8, "nodes_per_leaf": 16, "leaves_per_pod": 4}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(url: str, clients: int) -> tuple[str, list[tuple[str, str]]]:
    """Initializes the service and the fleet in-process; returns the operator token and (project, token) per client."""
    from fastapi.testclient import TestClient

    from supercluster.cluster.fleet import init_fleet
    from supercluster.service import tenancy
    from supercluster.service.app import create_app
    from supercluster.service.store import Store

    store = Store(url)
    with store.session() as s:
        op_token = tenancy.init_operator(s)
    init_fleet(store.fleet, "sim", spec=SPEC)
    op = {"Authorization": f"Bearer {op_token}"}
    out = []
    with TestClient(create_app(store=store, rate=1e6, burst=10**6)) as c:
        c.post("/v1/orgs", headers=op, json={"name": "bench"}).raise_for_status()
        for p in range(PROJECTS):
            c.post("/v1/orgs/bench/projects", headers=op, json={"name": f"p{p}"}).raise_for_status()
        for i in range(clients):
            project = f"p{i % PROJECTS}"
            c.post("/v1/users", headers=op, json={"name": f"u{i}", "org": "bench"}).raise_for_status()
            r = c.post("/v1/tokens", headers=op, json={"user": f"u{i}", "project": project, "role": "member"})
            r.raise_for_status()
            out.append((project, r.json()["token"]))
    store.dispose()
    return op_token, out


async def client(i: int, http: httpx.AsyncClient, project: str, start: asyncio.Event, until: list[float], lat, codes, created,
                 deleted):
    rng = random.Random(i)
    mine: list[str] = []
    n = 0
    async with http:
        await start.wait()
        while time.monotonic() < until[0]:
            roll = rng.random()
            if roll < 0.2:
                name = f"c{i}-{n}"
                n += 1
                route, call = "POST clusters", http.post(f"/v1/projects/{project}/clusters", json={"name": name, "gpus": 8})
            elif roll < 0.35 and mine:
                name = mine.pop(rng.randrange(len(mine)))
                route, call = "DELETE cluster", http.delete(f"/v1/projects/{project}/clusters/{name}")
            elif roll < 0.6:
                route, call = "GET clusters", http.get(f"/v1/projects/{project}/clusters")
            elif roll < 0.75:
                route, call = "GET quota", http.get(f"/v1/projects/{project}/quota")
            elif roll < 0.9:
                route, call = "GET usage", http.get("/v1/usage")
            else:
                route, call = "GET orgs", http.get("/v1/orgs")
            start = time.perf_counter()
            r = await call
            lat[route].append(time.perf_counter() - start)
            codes[r.status_code] += 1
            if route == "POST clusters" and r.status_code == 202:
                mine.append(name)
                created[project].append(name)
            elif route == "DELETE cluster":
                if r.status_code == 200:
                    deleted[project].append(name)
                else:
                    mine.append(name)


async def load(base: str, tokens, seconds: float):
    lat, codes, created, deleted = defaultdict(list), Counter(), defaultdict(list), defaultdict(list)
    # Each client has its own connection; all are made before the clock starts, with one TLS
    # context between them (httpx loads the CA bundle for each client otherwise, some 50 ms of
    # CPU apiece, which the first requests would wait behind and count as server latency).
    tls = ssl.create_default_context()
    https = [httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {t}"}, timeout=60, verify=tls) for _, t in tokens]
    start, until = asyncio.Event(), [0.0]
    tasks = [asyncio.create_task(client(i, http, p, start, until, lat, codes, created, deleted))
             for i, (http, (p, _)) in enumerate(zip(https, tokens))]
    await asyncio.sleep(0)
    wall = time.monotonic()
    until[0] = wall + seconds
    start.set()
    await asyncio.gather(*tasks)
    return lat, codes, created, deleted, time.monotonic() - wall


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--db", default=None, help="a PostgreSQL URL to run against (default: a temporary SQLite file)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server worker processes, beside the 1-worker reference")
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="sc-bench-service-")
    os.environ.setdefault("SUPERCLUSTER_HOME", folder)
    failed = False
    for workers in sorted({1, args.workers}):
        with fresh_db(args.db) as url:  # a new SQLite file, or a schema of its own on a server, dropped at the end
            failed |= run(args, url, workers)
    if failed:
        raise SystemExit(1)


def run(args, url: str, workers: int) -> bool:
    """One load run against a server of `workers` processes; True when it failed its checks."""
    op_token, tokens = prepare(url, args.clients)
    port = _port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "supercluster.cli.main", "server", "--port", str(port), "--db", url,
                               "--workers", str(workers)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/docs", timeout=2)
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.3)
        # the server's rate limit (50/s per token) is part of what is measured: 429s are counted, not errors
        server_cpu, client_cpu = _cpu_seconds(server.pid), _own_cpu_seconds()
        lat, codes, created, deleted, wall = asyncio.run(load(base, tokens, args.seconds))
        server_cpu, client_cpu = _cpu_seconds(server.pid) - server_cpu, _own_cpu_seconds() - client_cpu
        op = {"Authorization": f"Bearer {op_token}"}
        lost = duplicated = 0
        for p in range(PROJECTS):
            names = [c["name"] for c in httpx.get(f"{base}/v1/projects/p{p}/clusters", headers=op, timeout=120).json()]
            counts = Counter(names)
            expected = set(created[f"p{p}"]) - set(deleted[f"p{p}"])
            lost += len(expected - set(names)) + len(set(deleted[f"p{p}"]) & set(names))
            duplicated += sum(1 for v in counts.values() if v > 1) + len(set(names) - expected)
    finally:
        server.terminate()
        server.wait(timeout=30)
    total = sum(codes.values())
    print(f"{workers} worker(s): {args.clients} clients, {wall:.1f} s, {total} requests ({total / wall:.0f}/s), database "
          f"{url.split(':', 1)[0]}; CPU: {cpu_model()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    # CPU time per request does not depend on what else the machine runs; latency at a fixed
    # number of clients does (it is clients / throughput), so both are printed.
    # The clients run on the same cores: what they take is not the server's to use.
    print(f"server CPU {server_cpu:.1f} s, {1e3 * server_cpu / max(1, total):.1f} ms per request; "
          f"the clients' CPU {client_cpu:.1f} s, {1e3 * client_cpu / max(1, total):.1f} ms per request")
    print(f"{'route':16} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for route in sorted(lat):
        print(f"{route:16} {len(lat[route]):6d} {pct(lat[route], 0.5):8.1f} {pct(lat[route], 0.99):8.1f}")
    fivexx = sum(v for k, v in codes.items() if k >= 500)
    print(f"status codes: {dict(sorted(codes.items()))}; 5xx: {fivexx}; clusters created {sum(map(len, created.values()))}, "
          f"deleted {sum(map(len, deleted.values()))}, lost {lost}, duplicated {duplicated}")
    print(json.dumps({"workers": workers, "fivexx": fivexx, "lost": lost, "duplicated": duplicated,
                      "p99_ms": {r: round(pct(v, 0.99), 1) for r, v in lat.items()}}), flush=True)
    return bool(fivexx or lost or duplicated)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live children, the server's workers (Linux /proc; nan elsewhere)."""
    def fields(stat) -> list[str]:
        return open(stat).read().rsplit(")", 1)[1].split()

    try:
        own = fields(f"/proc/{pid}/stat")
    except OSError:
        return float("nan")
    total = int(own[11]) + int(own[12])
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                f = fields(f"/proc/{stat}/stat")
            except OSError:
                continue
            if int(f[1]) == pid:
                total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
