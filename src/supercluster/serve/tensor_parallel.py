"""Serving one model tensor-parallel over N local CPU ranks (gloo).

Rank 0 is the engine's own process: it owns the scheduler and the block pool. Ranks 1..N-1 are
worker processes (`python -m supercluster.serve.tp_worker`: a fresh interpreter, so nothing
depends on how the engine's own program was started). Every rank loads the run's model, keeps
its share of it (`shard_for_inference`: training's Megatron split without sequence parallelism,
attention heads and MLP columns split, the residual stream and the logits replicated, on plain
tensors since DTensor's dispatch outweighs a decode step's matmuls) and keeps a paged KV cache
of its own heads, with the same blocks at the same slots as rank 0's pool decides.

Each step rank 0 pickles the `StepBatch` down a socket pair to every worker, then all ranks run
the same forward; the model's all-reduces and its final all-gather keep them in lockstep, and
rank 0 samples from the replicated logits. The step goes down the socket rather than a gloo
broadcast so that an idle worker waits there, where no collective timeout runs out while nobody
asks for anything, and a worker whose engine died (even by SIGKILL) reads end-of-file and exits.
Collectives do have a timeout: a rank that hangs mid-step fails the step instead of holding the
server forever.

Each rank runs torch with cpus // N threads (at least one), so N ranks do not oversubscribe
the cores between them.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from supercluster.errors import UserError
from supercluster.serve.kv_cache import PagedKVCache
from supercluster.serve.runner import LocalRunner, StepBatch

TIMEOUT = timedelta(seconds=120)  # a collective (or the rendezvous) waiting longer than this fails


def cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_tp(tp: int, heads: int, kv_heads: int) -> None:
    if tp < 1:
        raise UserError(f"--tp must be at least 1, got {tp}.")
    if heads % tp or kv_heads % tp:
        raise UserError(f"--tp {tp} must divide the model's {heads} attention heads and {kv_heads} key/value heads.")
    if tp > cpus():  # each rank needs a core of its own, or the ranks wait on each other at every collective
        raise UserError(f"--tp {tp} is more than the {cpus()} CPUs this process may use; use at most {cpus()}.")


def threads_per_rank(tp: int) -> int:
    return max(1, cpus() // tp)


@dataclass
class RankSpec:
    """What a worker needs to build its share of the model: picklable for a spawned process."""

    run_dir: Path
    world: int
    store_port: int
    num_blocks: int
    block_size: int
    bf16: bool


def shard(model: torch.nn.Module, rank: int, spec: RankSpec) -> LocalRunner:
    """Join the ranks' process group and keep this rank's share of `model`: the rank's runner."""
    import torch.distributed as dist

    from supercluster.parallel.tensor import shard_for_inference

    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=spec.world, timeout=TIMEOUT)
    shard_for_inference(model, rank, spec.world)
    cfg = model.cfg
    cache = PagedKVCache(cfg.layers, spec.num_blocks, spec.block_size, cfg.kv_heads // spec.world, cfg.head_dim,
                         torch.bfloat16 if spec.bf16 else torch.float32, torch.device("cpu"))
    return LocalRunner(model, cache, torch.device("cpu"))


class TensorParallelRunner(LocalRunner):
    """Rank 0: a `LocalRunner` over its shard that first sends each step to the other ranks."""

    def __init__(self, model: torch.nn.Module, run_dir: Path, tp: int, num_blocks: int, block_size: int, bf16: bool):
        import torch.distributed as dist

        if dist.is_initialized():
            raise UserError("This process already belongs to a process group; a tensor-parallel engine needs its own.")
        self.workers: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self._old_threads = torch.get_num_threads()
        self.failed = ""  # why no step may run any more
        # Hosted here on a port the OS picks: no guessed free port that another process could take first.
        self.store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        spec = RankSpec(Path(run_dir), tp, self.store.port, num_blocks, block_size, bf16)
        try:
            for rank in range(1, tp):
                ours, theirs = socket.socketpair()
                with theirs:
                    self.workers.append(subprocess.Popen(
                        [sys.executable, "-m", "supercluster.serve.tp_worker", str(rank), str(theirs.fileno())],
                        pass_fds=[theirs.fileno()]))
                self.conns.append(Connection(ours.detach()))
                self.conns[-1].send_bytes(pickle.dumps(spec))
            torch.set_num_threads(threads_per_rank(tp))
            self._expect("loaded")  # a worker that cannot load the model fails the start now, not at a timeout
            runner = shard(model, 0, spec)
            self._expect("ready")
        except BaseException:
            self.close()
            raise
        super().__init__(runner.model, runner.cache, runner.device)

    def _expect(self, word: str) -> None:
        """Wait for every worker to report `word`; raise with its error or exit code if it does not."""
        deadline = time.monotonic() + TIMEOUT.total_seconds()
        for rank, (worker, conn) in enumerate(zip(self.workers, self.conns), start=1):
            while not conn.poll(0.1):
                if worker.poll() is not None:
                    raise RuntimeError(f"Tensor-parallel rank {rank} exited (code {worker.returncode}) while starting.")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Tensor-parallel rank {rank} did not start within {TIMEOUT.total_seconds():.0f} s.")
            try:
                answer = conn.recv()
            except EOFError:
                answer = f"it exited (code {worker.wait()})"
            if answer != word:
                raise RuntimeError(f"Tensor-parallel rank {rank} failed to start: {answer}")

    def problem(self) -> str:
        for rank, worker in enumerate(self.workers, start=1):
            if worker.poll() is not None and not self.failed:
                self.failed = f"rank {rank} exited with code {worker.returncode}"
        return self.failed

    def run(self, batch: StepBatch) -> torch.Tensor:
        if self.problem():  # fail at once, not after a collective's timeout
            raise RuntimeError(f"The tensor-parallel ranks cannot run another step ({self.failed}); restart the server.")
        try:
            message = pickle.dumps(batch)
            for conn in self.conns:
                conn.send_bytes(message)
            return super().run(batch)
        except Exception as err:
            # Another rank may still wait in this step's collectives: a next step would meet them
            # there and pair its own with the wrong ones. No step runs after a failed one.
            self.failed = f"{type(err).__name__}: {err}"
            raise

    def close(self) -> None:
        import torch.distributed as dist

        for conn in self.conns:
            try:
                conn.send_bytes(b"")  # stop
            except OSError:
                pass  # that worker is already gone
        for worker in self.workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:  # stuck in a collective: do not wait for its timeout
                worker.kill()
                worker.wait()
        for conn in self.conns:
            conn.close()
        self.workers, self.conns = [], []
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._old_threads)
