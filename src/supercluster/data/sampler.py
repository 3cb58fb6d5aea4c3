"""Deterministic, resumable, rank-aware batches of random windows of a token stream.

The start offsets of step s are a pure function of (seed, s), so the sampler's whole
state is its step counter: a resumed run sees exactly the batches an uninterrupted one
would. Each step draws the *global* batch of `batch_size` windows and data-parallel rank r
takes the r-th contiguous slice of it, so dp_size ranks together see exactly what one
process with dp_size=1 sees, and a run may resume under a different dp_size.

Validation: `eval_batches(val, ...)` yields the same fixed batches every time it is called
(steps 0..n-1 of a sampler with a fixed seed), so validation losses are comparable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from supercluster.errors import UserError

if TYPE_CHECKING:
    import torch


class StepSampler:
    """A sampler whose `batch(step)` is a pure function of (seed, step): its whole state is the step."""

    step: int
    seed: int

    def batch(self, step: int) -> tuple:
        raise NotImplementedError

    def next(self) -> tuple:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        try:
            step, seed = int(state["step"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"The checkpoint's sampler state {state!r} is not valid; it needs integer 'step' and 'seed'.") from None
        if step < 0 or seed < 0:
            raise UserError(f"The checkpoint's sampler state {state!r} has a negative step or seed.")
        self.step, self.seed = step, seed


class BatchSampler(StepSampler):
    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        name: str = "training",  # which split, for error messages
    ):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"train.seq_len and the batch size must be positive, got {seq_len} and {batch_size}.")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"Data-parallel rank {dp_rank} is out of range for {dp_size} ranks.")
        if batch_size % dp_size:
            raise UserError(f"The global batch of {batch_size} sequences does not divide over {dp_size} data-parallel ranks; use a multiple of {dp_size}.")
        if seed < 0:
            raise UserError(f"The data seed must be a non-negative integer, got {seed}.")
        if len(tokens) < seq_len + 1:
            raise UserError(
                f"The {name} split has {len(tokens)} tokens, fewer than the {seq_len + 1} one sequence needs "
                f"(train.seq_len + 1); use a bigger corpus or a smaller train.seq_len."
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.step = 0
        self._window = np.arange(seq_len + 1)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.dp_size

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of this rank's windows at `step` (a slice of the global batch's)."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # start + seq_len + 1 <= len
        b = self.local_batch_size
        return starts[self.dp_rank * b : (self.dp_rank + 1) * b]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets at `step`: int64 [batch_size // dp_size, seq_len] each."""
        import torch  # here, so that preparing data (a rank's first job) does not wait for torch's import

        windows = self.tokens[self.offsets(step)[:, None] + self._window]  # fancy index copies out of the memmap
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()



def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same `num_batches` validation batches on every call (this rank's slice of each)."""
    sampler = BatchSampler(tokens, seq_len, batch_size, dp_rank, dp_size, seed, name="validation")
    for step in range(num_batches):
        yield sampler.batch(step)
