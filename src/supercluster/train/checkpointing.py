"""When to checkpoint and what to keep: the policy, apart from the training loop.

`checkpoint` knows how to write, commit and load one checkpoint; this module decides when:
every `train.checkpoint_every` steps, and always at a run's end (its last step, or the step
at which `train.max_minutes` ran out), so that every run ends resumable and sampleable. A
background save is committed at the next step's end (it overlaps one step), and after each
commit all but the newest `train.keep_checkpoints` are deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from supercluster.train import checkpoint


class CheckpointManager:
    """One per rank; every rank makes the same calls at the same steps (saves are collective)."""

    def __init__(self, root: Path, train_cfg, model_parts: list, optimizers: list,
                 train_state: Callable[[], dict], async_group=None):
        self.root = Path(root)
        self.every = train_cfg.checkpoint_every
        self.keep = train_cfg.keep_checkpoints
        self.background = train_cfg.async_checkpoint
        self.model_parts, self.optimizers, self.train_state = model_parts, optimizers, train_state
        self.async_group = async_group
        self.pending: checkpoint.PendingSave | None = None
        self.saved_step: int | None = None  # the newest step committed or in flight

    def resume(self) -> tuple[dict, Path] | None:
        """Restore the newest complete checkpoint in place: (its train state, its path), or None."""
        found = checkpoint.latest(self.root)
        if found is None:
            return None
        state = checkpoint.load(found[1], self.model_parts, self.optimizers)
        self.saved_step = found[0]
        return state, found[1]

    def is_due(self, step: int, last: bool) -> bool:
        if step == 0 or step == self.saved_step:  # nothing trained yet, or this step is on disk already
            return False
        return last or bool(self.every and step % self.every == 0)

    def step_done(self, step: int, last: bool = False) -> bool:
        """After each optimizer step: commit a save in flight, then save this step if due."""
        self.commit()
        if not self.is_due(step, last):
            return False
        # Replacing a committed step happens only when a run that did not resume (run.resume=false)
        # reaches a step an earlier run in the same folder saved: the new state wins.
        pending = checkpoint.save(self.root, step, self.model_parts, self.optimizers, self.train_state(),
                                  async_group=self.async_group if self.background else None, replace=True)
        self.saved_step = step
        if pending.future is not None:
            self.pending = pending
        else:
            self._purge()
        return True

    def commit(self) -> None:
        """Finish a background save (if one is in flight): it becomes the latest checkpoint."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            self._purge()

    def close(self, step: int) -> None:
        """The run's end: its last step saved (unless it is already) and committed."""
        self.step_done(step, last=True)
        self.commit()

    def _purge(self) -> None:
        checkpoint.purge(self.root, self.keep)
