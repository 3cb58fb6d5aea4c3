"""What each rank runs (torchrun's entry point): train from the run directory's config.toml."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import write_atomic
from supercluster.train.config import Config, load_config


def run(cfg: Config) -> dict:
    """Train in this process (one rank of the job); rank 0 writes summary.json."""
    from supercluster.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
        if trainer.rank == 0:
            summary["resumed_from"] = str(trainer.resumed_from) if trainer.resumed_from else None
            write_atomic(Path(cfg.run.dir) / "summary.json", json.dumps(summary, indent=1))
        return summary
    finally:
        trainer.close()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(load_config(argv[0], argv[1:]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
