"""Start a training job on this node: ranks through torchrun, or in this process for one.

The parent validates the config and prepares the data once (tokenizer and token shards
are cached), writes `config.toml` into the run directory, then hands that file to every
rank. torchrun owns rendezvous, worker processes and restarts; a restarted worker finds
the latest checkpoint in the run directory and resumes on its own.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import write_atomic
from supercluster.train.config import Config, check_splits, layout_of, validate


@dataclass
class TorchrunSpec:
    """How torchrun starts this node's ranks: its flags (a cluster job is described elsewhere)."""

    nproc: int = 1  # ranks on this node
    nnodes: int = 1
    node_rank: int = 0
    rdzv: str | None = None  # HOST:PORT of the c10d rendezvous, for several nodes
    rdzv_id: str | None = None  # the job's id, the same on every node
    max_restarts: int = 0

    @classmethod
    def for_config(cls, cfg: Config, nproc: int | None = None, nnodes: int | None = None, **rest) -> "TorchrunSpec":
        """Flags win; else the size the config was planned for ([launch]); else one rank."""
        return cls(nproc or cfg.launch.nproc or 1, nnodes or cfg.launch.nnodes or 1, **rest)

    def check(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise UserError(f"--nproc and --nnodes must be at least 1, got {self.nproc} and {self.nnodes}.")
        cores = os.cpu_count() or 1
        if self.nproc > max(4 * cores, 8):
            raise UserError(f"--nproc {self.nproc} is far more ranks than this machine's {cores} cores can run; use at most {max(4 * cores, 8)}.")
        if self.nnodes > 1 and not self.rdzv:
            raise UserError("Training on several nodes needs --rdzv HOST:PORT, the rendezvous on the first node.")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}.")
        if self.rdzv is not None:
            host, _, port = self.rdzv.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise UserError(f"--rdzv must be HOST:PORT with a port in 1..65535 (the first node's address), got {self.rdzv!r}.")


def check_run(cfg: Config, launch: TorchrunSpec):
    """The checks that need neither data nor devices: the launch, the config and its layout on
    the launch's ranks; returns the model config."""
    from supercluster.parallel import ParallelDims

    launch.check()
    world = launch.nproc * launch.nnodes
    model_cfg = validate(cfg)
    ParallelDims.of(layout_of(cfg, world), world, model_cfg, cfg.train.seq_len, cfg.train.global_batch, launch.nproc)
    return model_cfg


def prepare_run(cfg: Config, launch: TorchrunSpec) -> Path:
    """Checks, data and the run directory: everything that must happen once, before ranks start."""
    from supercluster.data import prepare_data

    model_cfg = check_run(cfg, launch)
    if Path(cfg.run.dir).exists() and not Path(cfg.run.dir).is_dir():  # before the data, which takes a while
        raise UserError(f"run.dir {cfg.run.dir!r} is a file, not a folder; set run.dir to a new or existing run directory.")
    from supercluster.data.mixture import open_prepared, run_tokenizer_digest, uses_prepared
    from supercluster.model.weights import imported_tokenizer
    from supercluster.train.packed import open_packed, packs

    run_dir = Path(cfg.run.dir)
    if packs(cfg):  # one prepared dataset read as packed documents (chat data, data.document_mask)
        packed = open_packed(cfg, model_cfg.vocab_size, run_dir)
        tokenizer_path = packed.dataset.tokenizer_path
        facts = {"source": f"prepared {cfg.data.path}", "train_documents": packed.train_documents,
                 "val_documents": packed.val_documents, "rows_per_epoch": packed.train.rows_per_epoch,
                 "truncated_documents": packed.train.truncated, "loss_mask": packed.dataset.has_loss_mask}
    elif uses_prepared(cfg.data):
        data = open_prepared(cfg.data.path, cfg.data.mix, cfg.data.val_fraction, model_cfg.vocab_size,
                             run_tokenizer_digest(run_dir))
        check_splits(cfg, data.train_tokens, data.val_tokens)  # every dataset of a mixture holds a sequence
        tokenizer_path = data.tokenizer_path
        facts = {"source": data.source, "train_tokens": sum(len(s.tokens) for s in data.train),
                 "val_tokens": sum(len(s.tokens) for s in data.val)}
    else:
        data = prepare_data(cfg.data.path, model_cfg.vocab_size, val_fraction=cfg.data.val_fraction, max_mb=cfg.data.max_mb,
                            tokenizer_path=imported_tokenizer(run_dir))
        check_splits(cfg, len(data.train), len(data.val))
        tokenizer_path = data.tokenizer_path
        facts = {"source": data.source, "train_tokens": len(data.train), "val_tokens": len(data.val)}
    run_dir.mkdir(parents=True, exist_ok=True)
    # Every node of a job runs this on the same run directory at once: atomic writes only.
    cfg.save(run_dir / "config.toml")
    if tokenizer_path is not None:
        write_atomic(run_dir / "tokenizer.json", Path(tokenizer_path).read_bytes())
    write_atomic(run_dir / "data.json", json.dumps(facts))
    return run_dir


def finished_summary(cfg: Config) -> dict | None:
    """The summary of a run directory already trained to `train.steps` or beyond, else None.

    Resuming such a run would train nothing and write a summary without figures over the real
    one; the caller reports it as complete instead and leaves the folder as it is.
    """
    from supercluster.train.checkpoint import latest
    from supercluster.train.metrics import read_metrics

    run_dir = Path(cfg.run.dir)
    found = latest(run_dir / "checkpoints") if cfg.run.resume else None
    if found is None or found[0] < cfg.train.steps:
        return None
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:  # stopped after its last checkpoint, before the summary: the last step's figures
        summary = (read_metrics(run_dir / "metrics.jsonl") or [{}])[-1]
    return {**summary, "already_trained": found[0]}


def launch_training(cfg: Config, launch: TorchrunSpec) -> dict:
    """Run the job to its end on this node; returns rank 0's summary (on node 0).

    A run already trained to its steps is not started again: its summary comes back with
    `already_trained` (the step of its latest checkpoint)."""
    validate(cfg)
    if (finished := finished_summary(cfg)) is not None:
        return finished
    run_dir = prepare_run(cfg, launch)
    if launch.nproc == 1 and launch.nnodes == 1 and launch.max_restarts == 0:
        from supercluster.train.worker import run

        return run(cfg)
    _torchrun(run_dir / "config.toml", launch)
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def _torchrun(config_path: Path, launch: TorchrunSpec) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = [f"--nproc-per-node={launch.nproc}", f"--nnodes={launch.nnodes}", f"--max-restarts={launch.max_restarts}"]
    if launch.nnodes == 1 and not launch.rdzv:
        args.append("--standalone")
    else:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv}", f"--rdzv-id={launch.rdzv_id or uuid.uuid5(uuid.NAMESPACE_URL, str(config_path.resolve()))}",
                 f"--node-rank={launch.node_rank}"]
    args += ["-m", "supercluster.train.worker", str(config_path)]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc)))
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise UserError(
            f"Training failed: rank {rank} exited with code {failure.exitcode} (its message is above)."
        ) from None
