"""A tensor-parallel worker rank of a serving engine, started by `supercluster.serve.tensor_parallel`:

    python -m supercluster.serve.tp_worker RANK FD

FD is this rank's end of a socket pair to rank 0. Rank 0 sends the `RankSpec` first; the worker
answers "loaded" once it has the model and "ready" once it has joined the process group and
sharded it (or the error that stopped it), then runs every `StepBatch` rank 0 sends until an
empty message or end-of-file.
"""

from __future__ import annotations

import pickle
import signal
import sys
from multiprocessing.connection import Connection

import torch


def main(rank: int, conn: Connection) -> None:
    import torch.distributed as dist

    from supercluster.serve.tensor_parallel import shard, threads_per_rank
    from supercluster.train.sample import load_trained

    spec = pickle.loads(conn.recv_bytes())
    torch.set_num_threads(threads_per_rank(spec.world))
    try:
        model = load_trained(spec.run_dir).eval()
        conn.send("loaded")  # rank 0 now joins the process group, knowing we will too
        runner = shard(model, rank, spec)
    except Exception as err:
        conn.send(f"{type(err).__name__}: {err}")
        return
    conn.send("ready")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            while message := conn.recv_bytes():  # empty: rank 0's stop
                runner.run(pickle.loads(message))
    except (EOFError, OSError):
        pass  # rank 0 is gone: nothing left to serve
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 stops us
    main(int(sys.argv[1]), Connection(int(sys.argv[2])))
