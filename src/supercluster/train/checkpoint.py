"""Checkpoints: sharded DCP saves, atomic by rename, the last K kept, found again on resume.

A checkpoint is the folder `checkpoints/step_NNNNNNNN/` holding DCP shards of the model
and optimizer (in any layout; DCP reshards on load; the optimizer state is flattened to
one key per parameter name, so it moves between layouts that group parameters
differently, pipeline stages included), `train_state.json` (step, sampler,
tokens seen) and each rank's RNG state. It is written as `step_NNNNNNNN.tmp/`, fsynced, and
renamed only once every rank has finished, so a crash at any instant leaves nothing resume
would trust half-written, and never removes a committed checkpoint before its successor is
durable. When to save and what to purge is `checkpointing.CheckpointManager`'s decision.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from supercluster.errors import UserError
from supercluster.files import commit_directory, write_atomic

# One process without a process group (tests, sampling) is a normal way to use DCP here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_NAME = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first (a .tmp folder is never complete)."""
    if not Path(root).is_dir():
        return []
    found = []
    for path in Path(root).iterdir():
        match = _NAME.match(path.name)
        if match and (path / TRAIN_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(root: Path) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _state_dicts(models, optimizers) -> tuple[list[dict], list[dict]]:
    """Per model part (one, or this rank's pipeline stages): its model and optimizer state."""
    pairs = [get_state_dict(m, o, options=_OPTIONS) for m, o in zip(_as_list(models), _as_list(optimizers))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def save(root: Path, step: int, model, optimizer, train_state: dict, async_group=None, replace: bool = False):
    """Save `model` and `optimizer` (or lists of them, one per pipeline stage on this rank).

    With `async_group` (a process group of its own, so the background writes never interleave
    with training's collectives) the state is copied and written in the background: the
    returned `PendingSave` commits it once `wait()`ed on (the trainer does so before the next
    step), and until then a crash leaves only the previous checkpoint. Without, it commits now.
    A committed `step_N/` is never overwritten unless `replace` (then the old one is renamed
    aside until the new one is durable).
    """
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sds, optim_sds = _state_dicts(model, optimizer)
    merged = lambda sds: {k: v for sd in sds for k, v in sd.items()}  # noqa: E731
    state = {"model": merged(model_sds), "optim": merged(optim_sds)}
    torch.save(torch.get_rng_state(), tmp / f"rng_{_rank()}.pt")
    pending = PendingSave(step, tmp, final, {**train_state, "step": step}, replace)
    if async_group is not None:
        pending.future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=async_group)
        return pending
    dcp.save(state, checkpoint_id=str(tmp))
    pending.wait()
    return pending


class PendingSave:
    """A checkpoint written to `step_N.tmp/` that becomes `step_N/` when every rank is done."""

    def __init__(self, step, tmp, final, train_state, replace=False):
        self.step, self.tmp, self.final, self.train_state, self.replace = step, tmp, final, train_state, replace
        self.future = None

    def wait(self) -> Path:
        if self.future is not None:
            result = self.future.result()
            if hasattr(result, "upload_completion"):  # an AsyncSaveResponse
                result.upload_completion.result()
        _barrier()
        if _rank() == 0:
            # train_state.json marks a checkpoint complete: written whole, inside the folder,
            # before the folder's one atomic rename.
            write_atomic(self.tmp / TRAIN_STATE, json.dumps(self.train_state))
            commit_directory(self.tmp, self.final, replace=self.replace)
        _barrier()
        return self.final


def purge(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` (at least one) complete checkpoints; returns those
    deleted. Rank 0 deletes (other ranks return []): the folder is shared by all of them."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if _rank() != 0:
        return []
    old = [path for _, path in list_checkpoints(root)[:-keep]]
    # Saves a crash cut short, and checkpoints a crash left renamed aside: resume never reads them.
    # (Called between saves, so no save of this run is in flight.)
    old += [path for path in Path(root).glob("step_*.tmp")] + [path for path in Path(root).glob(".step_*.replaced-*")]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def check_complete(path: Path) -> None:
    """Refuse a checkpoint whose shard files are shorter than DCP's metadata says they are
    (a copy cut short, a disk that filled): DCP itself reads only the bytes a load asks for,
    so sampling or exporting the weights would not notice a shard that lost its tail."""
    path = Path(path)
    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as err:  # no or unreadable .metadata: the checkpoint is not whole
        raise UserError(f"Checkpoint {str(path)!r} has no readable metadata ({type(err).__name__}); it is corrupt: "
                        f"delete it to use the one before, or set run.resume=false to start over.") from None
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        have = (path / name).stat().st_size if (path / name).is_file() else 0
        if have < size:
            raise UserError(f"Checkpoint {str(path)!r} is corrupt: {name} holds {have:,} of its {size:,} bytes (cut short); delete it "
                            f"to use the one before, or set run.resume=false to start over.")


def load(path: Path, model, optimizer) -> dict:
    """Restore model(s), optimizer(s) and this rank's RNG in place; return the train state."""
    path = Path(path)
    check_complete(path)
    try:
        train_state = json.loads((path / TRAIN_STATE).read_text())
        model_sds, optim_sds = _state_dicts(model, optimizer)
        state = {"model": {k: v for sd in model_sds for k, v in sd.items()},
                 "optim": {k: v for sd in optim_sds for k, v in sd.items()}}
        dcp.load(state, checkpoint_id=str(path))
        for m, o, msd, osd in zip(_as_list(model), _as_list(optimizer), model_sds, optim_sds):
            set_state_dict(m, o, model_state_dict={k: state["model"][k] for k in msd},
                           optim_state_dict={k: state["optim"][k] for k in osd}, options=_OPTIONS)
    except (Exception, CheckpointException) as err:  # DCP's error is a BaseException; the files are at fault
        raise UserError(
            f"Checkpoint {str(path)!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            f"it is corrupt or from a different model: delete it, or set run.resume=false to start over."
        ) from None
    rng = path / f"rng_{_rank()}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng))
    return train_state


def load_model_only(path: Path, model) -> None:
    """Weights alone into a plain, unsharded model (sampling, export), from any layout."""
    check_complete(path)
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:
        raise UserError(
            f"Checkpoint {str(path)!r} could not be loaded ({type(err).__name__}); it is corrupt or from a different model."
        ) from None
    model.load_state_dict(state["model"])
