"""`supercluster train RUN_DIR`: fine-tune an imported or trained run into a new run directory.

The new run starts from the source's config (shape, fine-tuning defaults), weights (an
imported model's `weights.safetensors`, or the latest checkpoint of a trained run, written as
one) and tokenizer files (tokenizer, special tokens, chat template), so `sample`, `serve`
and `export` read it like any run, before and after training. The source is never written.
The folder is built under a temporary name and renamed whole; running the same command again
continues the new run from its checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import write_atomic

# What a fine-tuned run takes from its source besides the weights: how it reads and writes text.
CARRIED = ("tokenizer.json", "special_tokens.json", "chat_template.jinja")
SOURCE_FILE = "fine_tuned_from.json"


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.toml").is_file()


def default_out(source: Path) -> Path:
    source = Path(source).expanduser().absolute()
    return source.with_name(f"{source.name}-sft")


def start_from(source: Path, out: Path | None = None) -> Path:
    """The new run directory `out` (default SOURCE-sft) holding the source's config, weights and
    tokenizer; an existing one made from the same source is returned as it is (to continue)."""
    from supercluster.model.weights import WEIGHTS_FILE

    source = Path(source).expanduser().absolute()
    if not is_run_dir(source):
        raise UserError(f"{str(source)!r} is a folder without config.toml; give a run directory (from `supercluster import` "
                        f"or a training run) or a TOML config file.")
    out = Path(out).expanduser().absolute() if out is not None else default_out(source)
    if out == source:
        raise UserError("--out must be a new run directory, not the source run itself (fine-tuning never writes into it).")
    if out.exists():
        origin = out / SOURCE_FILE
        if is_run_dir(out) and origin.is_file() and json.loads(origin.read_text()).get("source") == str(source):
            return out  # made by an earlier call of the same command: continue it
        if out.is_file() or any(out.iterdir()):
            raise UserError(f"{str(out)!r} already exists and is not a fine-tuning run of {str(source)!r}; "
                            f"choose another --out or delete it.")
    from supercluster.train import checkpoint
    from supercluster.train.config import load_config

    cfg = load_config(source / "config.toml")
    found = checkpoint.latest(source / "checkpoints")
    if found is None and not (source / WEIGHTS_FILE).is_file():
        raise UserError(f"Run {str(source)!r} has neither a checkpoint nor imported weights to start from; train it first.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.start-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in CARRIED:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        if found is not None:  # a trained run: its latest weights, whatever layout wrote them
            from supercluster.model.weights import save_weights, stored_names
            from supercluster.train.sample import load_trained

            model = load_trained(source)
            state = model.state_dict()
            save_weights({k: state[k] for k in stored_names(model)}, tmp / WEIGHTS_FILE)
        else:
            _link_or_copy(source / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        cfg.run.dir, cfg.run.resume = str(out), True
        cfg.save(tmp / "config.toml")
        write_atomic(tmp / SOURCE_FILE, json.dumps({"source": str(source), "step": found[0] if found else None}) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (weights files are replaced by rename, never
    written in place, so sharing the inode is safe), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
