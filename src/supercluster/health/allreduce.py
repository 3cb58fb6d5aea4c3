"""All-reduce bus bandwidth, in a node (spawned processes) or across nodes (the backend's launch, srun on Slurm).

busbw follows nccl-tests: algbw = bytes / time per all-reduce, busbw = algbw * 2(n-1)/n, the
rate each rank's link must sustain, comparable across rank counts. The backend is NCCL on
NVIDIA/AMD GPUs and gloo on CPUs. Ranks meet at a TCPStore hosted by the launching process, so
neither a free-port guess nor a shared filesystem is needed.

Run as `python -m supercluster.health.allreduce --store HOST:PORT ...` by `Backend.launch_on`:
each task takes its rank from SLURM_PROCID (RANK) and its local device from SLURM_LOCALID
(LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

from supercluster.health.results import Measurement

RESULT_PREFIX = "SUPERCLUSTER_ALLREDUCE "
TIMEOUT = timedelta(seconds=120)


def bus_bandwidth(nbytes: int, seconds_per_op: float, ranks: int) -> float:
    """nccl-tests' all-reduce busbw in GB/s."""
    return nbytes / seconds_per_op * 2 * (ranks - 1) / ranks / 1e9


def cpu_stall_s() -> float | None:
    """Seconds that some task on this machine has waited for a CPU since boot (Linux PSI), or None.

    CPU ranks share their cores with whatever else runs: while tasks wait for a CPU, an all-reduce
    measures the crowd, not the node (`thresholds.judge` does not fail a node on such a figure).
    """
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def _run_rank(rank: int, world: int, host: str, port: int, nbytes: int, iters: int, local_device: int,
              slow_rank: int | None = None, slowdown_s: float = 0.0) -> dict | None:
    """One rank's part: warm up, time `iters` all-reduces; rank 0 returns the result.

    `slow_rank`/`slowdown_s` make one rank sleep before each op: a throttled worker, used to
    show that a slow participant shows up in the bus bandwidth.
    """
    import torch
    import torch.distributed as dist

    from supercluster.hardware.device import select_device

    device = select_device(local_device)
    backend = dist.get_default_backend_for_device(device)
    store = dist.TCPStore(host, port, world, is_master=False, timeout=TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        tensor = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        sync = (lambda: torch.accelerator.synchronize(device)) if device.type != "cpu" else (lambda: None)
        for _ in range(2):
            dist.all_reduce(tensor)
        sync()
        dist.barrier()
        stalled_before, started = cpu_stall_s(), time.perf_counter()
        times = []
        for _ in range(iters):
            if rank == slow_rank:
                time.sleep(slowdown_s)
            start = time.perf_counter()
            dist.all_reduce(tensor)
            sync()
            times.append(time.perf_counter() - start)
        contention = None
        if device.type == "cpu" and stalled_before is not None:
            contention = (cpu_stall_s() - stalled_before) / (time.perf_counter() - started)
        elapsed = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # in each op, the slowest rank sets the pace
        # The fastest op, as every probe here (`hardware.timing`): other work on a node can only
        # slow an op down, and a rank that is slow every time still slows every op.
        per_op = elapsed.min().item()
        if rank != 0:
            return None
        return {
            "busbw": bus_bandwidth(tensor.nbytes, per_op, world),
            "algbw": tensor.nbytes / per_op / 1e9,
            "ranks": world, "bytes": tensor.nbytes, "iters": iters, "backend": backend,
            "seconds_per_op": per_op, "mean_seconds_per_op": elapsed.mean().item(), "cpu_contention": contention,
        }
    finally:
        dist.destroy_process_group()


def _spawned_rank(rank, world, host, port, nbytes, iters, slow_rank, slowdown_s, queue):
    result = _run_rank(rank, world, host, port, nbytes, iters, rank, slow_rank, slowdown_s)
    if result is not None:
        queue.put(result)


def _master_store(world: int):
    import torch.distributed as dist

    # port 0: the OS picks a free port; the ranks learn it from us
    return dist.TCPStore("0.0.0.0", 0, world, is_master=True, wait_for_workers=False, timeout=TIMEOUT)


def intra_node(nbytes: int, iters: int, ranks: int | None = None, slow_rank: int | None = None,
               slowdown_s: float = 0.0) -> Measurement:
    """All-reduce busbw among processes on this node: one per GPU, or `ranks` (default 2) on CPU."""
    import torch.multiprocessing as mp

    from supercluster.health.measure import device_kind

    kind, count = device_kind()
    ranks = ranks or (count if count else 2)
    if ranks < 2:
        return Measurement.skipped("allreduce_busbw", "GB/s", f"{ranks} accelerator: an all-reduce needs 2 ranks",
                                   applies=False)
    store = _master_store(ranks)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _spawned_rank, args=(ranks, "127.0.0.1", store.port, nbytes, iters, slow_rank, slowdown_s, queue),
        nprocs=ranks, join=True, start_method="spawn",
    )
    result = queue.get()
    return Measurement("allreduce_busbw", result.pop("busbw"), "GB/s", result)


def multi_node(backend, nodes: list[str], nbytes: int, iters: int, tasks_per_node: int = 1,
               reservation: str | None = None, timeout_s: float = 600) -> Measurement:
    """All-reduce busbw across `nodes`, launched as one step by the fleet's backend, one task per device.

    `backend` is a `supercluster.cluster.backends.Backend` (Slurm launches the step with srun);
    `reservation` runs it inside a cluster's reservation.
    """
    check = "multinode_allreduce_busbw"
    if len(nodes) < 2:
        return Measurement.skipped(check, "GB/s", "one node: a multi-node all-reduce needs 2", applies=False)
    store = _master_store(len(nodes) * tasks_per_node)
    argv = [sys.executable, "-m", "supercluster.health.allreduce",
            "--store", f"{socket.gethostname()}:{store.port}", "--bytes", str(nbytes), "--iters", str(iters)]
    try:
        proc = backend.launch_on(nodes, argv, tasks_per_node=tasks_per_node, timeout=timeout_s, reservation=reservation)
    except subprocess.TimeoutExpired:
        return Measurement.skipped(check, "GB/s", f"the launch did not finish within {timeout_s:.0f} s")
    if proc is None:
        return Measurement.skipped(check, "GB/s", f"the {backend.name} backend launches no multi-node job", applies=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result["nodes"] = nodes
            return Measurement(check, result.pop("busbw"), "GB/s", result)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return Measurement.skipped(check, "GB/s", f"the launch exited {proc.returncode}: {tail[0]}")


def _env(slurm: str, generic: str, default: str | None = None) -> str:
    """A task's placement from Slurm's variables, else the generic ones (see `Backend.launch_on`)."""
    value = os.environ.get(slurm, os.environ.get(generic, default))
    if value is None:
        raise SystemExit(f"neither {slurm} nor {generic} is set: run this under the fleet backend's launch_on")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description="One rank of a multi-node all-reduce bandwidth test (started by the backend's launch_on).")
    parser.add_argument("--store", required=True, help="HOST:PORT of the launcher's TCPStore")
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--iters", type=int, required=True)
    args = parser.parse_args(argv)
    host, port = args.store.rsplit(":", 1)
    rank, world = int(_env("SLURM_PROCID", "RANK")), int(_env("SLURM_NTASKS", "WORLD_SIZE"))
    result = _run_rank(rank, world, host, int(port), args.bytes, args.iters, int(_env("SLURM_LOCALID", "LOCAL_RANK", "0")))
    if result is not None:
        print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
