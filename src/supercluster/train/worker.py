"""What each rank runs (torchrun's entry point): train from the run directory's config.toml."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import write_atomic
from supercluster.train.config import Config, load_config

STOPPED_EXIT = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


def run(cfg: Config) -> dict:
    """Train in this process (one rank of the job); rank 0 writes summary.json."""
    from supercluster.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
        if trainer.rank == 0:
            summary.update(step_time_vs_plan(Path(cfg.run.dir) / "metrics.jsonl", cfg.train.predicted_step_time_s))
            summary["resumed_from"] = str(trainer.resumed_from) if trainer.resumed_from else None
            write_atomic(Path(cfg.run.dir) / "summary.json", json.dumps(summary, indent=1))
        return summary
    finally:
        trainer.close()


def step_time_vs_plan(metrics_path: Path, predicted: float | None) -> dict:
    """The run's typical step time (median, first step and the step whose collectives were
    counted left out: warm-up and instrumentation) beside the planner's prediction."""
    from statistics import median

    from supercluster.train.metrics import read_metrics

    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    times = [r["step_time_s"] for r in records[1:] if not r.get("comm_measured")] or [r["step_time_s"] for r in records]
    out = {"measured_step_time_s": median(times) if times else None, "predicted_step_time_s": predicted}
    if predicted and times:
        out["measured_over_predicted"] = out["measured_step_time_s"] / predicted
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        summary = run(load_config(argv[0], argv[1:]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if summary.get("stopped_by"):  # checkpointed and stopped early: not a completed run
        sys.exit(STOPPED_EXIT)


if __name__ == "__main__":
    main()
