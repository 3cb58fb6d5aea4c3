"""Placement on the simulated 10,240-GPU fleet (1,280 nodes x 8 H100, 32 nodes per leaf, 16 leaves per pod).

1,000 random create/delete requests (8 to 1,024 GPUs, log-uniform), run twice with the same seed:
  - through the real path (`clusters.create_cluster` / `delete_cluster` on a fleet DB: a fresh
    SQLite file by default, or `--db postgresql://...`, where it works in a schema of its own
    that it drops at the end):
    p50/p99 latency, mean leaf switches per cluster against the lower bound, and the share of
    free GPUs that a 512-GPU request could still use (sampled every 50 requests);
  - in memory with a first-fit reference (nodes in name order, no topology), same requests,
    for the ratio of switches and fragmentation.

    .venv/bin/python bench/placement.py [--requests 1000] [--seed 0] [--db URL]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from supercluster.cluster import clusters, fleet, placement
from supercluster.cluster.backends.sim import DEFAULT_SPEC, build
from supercluster.cluster.state import Database, make_engine
from supercluster.errors import UserError

NODE_GPUS, PER_LEAF = DEFAULT_SPEC["gpus_per_node"], DEFAULT_SPEC["nodes_per_leaf"]


def random_size(rng: random.Random) -> int:
    return NODE_GPUS * max(1, round(2 ** rng.uniform(0, 7)))  # 8 .. 1024 GPUs


def usable_by(free: list[placement.Free], size: int, max_switches: int | None) -> int:
    """GPUs that back-to-back requests of `size` could take from this free state."""
    pool, used = list(free), 0
    while (p := placement.place(pool, size, NODE_GPUS, max_switches)) is not None:
        taken = {n for n, _ in p.nodes}
        pool = [f for f in pool if f.name not in taken]
        used += size
    return used


def first_fit(free: list[placement.Free], size: int) -> placement.Placement | None:
    whole = [f for f in sorted(free, key=lambda f: f.name) if f.free == f.total][: size // NODE_GPUS]
    if len(whole) < size // NODE_GPUS:
        return None
    return placement.Placement(tuple((f.name, f.total) for f in whole), len({f.leaf for f in whole}), len({f.pod for f in whole}))


def replay(n_requests: int, seed: int, create, delete, free_state) -> dict:
    rng = random.Random(seed)
    live: list[str] = []
    create_ms, delete_ms, ratios, share, share_tight, rejected = [], [], [], [], [], 0
    for i in range(n_requests):
        if live and (rng.random() < 0.45 or len(live) > 40):
            name = live.pop(rng.randrange(len(live)))
            t = time.perf_counter()
            delete(name)
            delete_ms.append(1e3 * (time.perf_counter() - t))
        else:
            size, name = random_size(rng), f"c{i}"
            t = time.perf_counter()
            leaves = create(name, size)
            create_ms.append(1e3 * (time.perf_counter() - t))
            if leaves is None:
                rejected += 1
            else:
                live.append(name)
                ratios.append(leaves / placement.lower_bound(size, NODE_GPUS, PER_LEAF))
        if i % 50 == 49:
            free = free_state()
            total_free = sum(f.free for f in free)
            if total_free >= 512:
                share.append(usable_by(free, 512, None) / total_free)
                share_tight.append(usable_by(free, 512, 2) / total_free)
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {
        "create_p50_ms": pct(create_ms, 0.5), "create_p99_ms": pct(create_ms, 0.99),
        "delete_p50_ms": pct(delete_ms, 0.5) if delete_ms else math.nan,
        "switch_ratio": statistics.mean(ratios), "placed": len(ratios), "rejected": rejected,
        "share_512": statistics.mean(share), "share_512_2sw": statistics.mean(share_tight),
    }


@contextlib.contextmanager
def fresh_db(url: str | None):
    """A new, empty fleet database: a temporary SQLite file, or a private schema on a server."""
    if url is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'fleet.db'}"
        return
    schema = f"sc_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield sa.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def run_db(n: int, seed: int, url: str | None = None) -> dict:
    with fresh_db(url) as db_url:
        db = Database(db_url)
        fleet.init_fleet(db, "sim")
        gc.collect()
        gc.freeze()  # as the server does once started: full collections then skip what lives forever

        def create(name, size):
            try:
                return clusters.create_cluster(db, name, size, wait=False)["leaves"]
            except UserError:
                return None

        def free_state():
            return [placement.Free(n["name"], n["leaf"], n["pod"], n["gpus"] - n["used_gpus"], n["gpus"]) for n in fleet.nodes(db)]

        try:
            return replay(n, seed, create, lambda name: clusters.delete_cluster(db, name), free_state)
        finally:
            db.dispose()


def run_memory(n: int, seed: int, policy) -> dict:
    nodes = {s.name: s for s in build(DEFAULT_SPEC)}
    used: dict[str, int] = {}
    owner: dict[str, list[str]] = {}

    def free_state():
        return [placement.Free(s.name, s.leaf, s.pod, s.gpus - used.get(s.name, 0), s.gpus) for s in nodes.values()]

    def create(name, size):
        p = policy(free_state(), size)
        if p is None:
            return None
        for node, gpus in p.nodes:
            used[node] = used.get(node, 0) + gpus
        owner[name] = list(p.nodes)
        return p.leaves

    def delete(name):
        for node, gpus in owner.pop(name):
            used[node] -= gpus

    return replay(n, seed, create, delete, free_state)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--db", help="a PostgreSQL URL to run against (default: a temporary SQLite file)")
    args = ap.parse_args()

    ours_db = run_db(args.requests, args.seed, args.db)
    dialect = sa.make_url(args.db).get_backend_name() if args.db else "sqlite"
    ours = run_memory(args.requests, args.seed, lambda free, size: placement.place(free, size, NODE_GPUS))
    ref = run_memory(args.requests, args.seed, first_fit)
    print(f"{args.requests} random create/delete requests, 8-1024 GPUs, on 1,280 x 8 H100 (32 nodes/leaf, 16 leaves/pod)")
    print(f"through the fleet DB ({dialect}): create p50 {ours_db['create_p50_ms']:.1f} ms, p99 {ours_db['create_p99_ms']:.1f} ms; "
          f"delete p50 {ours_db['delete_p50_ms']:.1f} ms; placed {ours_db['placed']}, rejected {ours_db['rejected']}")
    print(f"  leaf switches per cluster / lower bound: {ours_db['switch_ratio']:.3f}")
    print(f"  free GPUs a 512-GPU request could use: {100 * ours_db['share_512']:.1f}% "
          f"({100 * ours_db['share_512_2sw']:.1f}% on the minimum 2 leaf switches)")
    print("in memory, same requests: topology-aware vs first-fit reference")
    for key, label in (("switch_ratio", "switches / lower bound"), ("share_512", "512-GPU usable share"),
                       ("share_512_2sw", "512-GPU usable share on 2 switches")):
        print(f"  {label:36s} ours {ours[key]:.3f}  first-fit {ref[key]:.3f}  ratio {ours[key] / ref[key]:.2f}x")


if __name__ == "__main__":
    main()
