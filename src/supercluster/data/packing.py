"""Packing whole documents (chat samples) into fixed-length rows, first-fit, with their
document boundaries and loss masks.

Each document of n tokens gives n-1 (input, target) pairs, at most `seq_len` of them (longer
chat samples are cut, and counted; longer plain documents continue in further pieces);
documents are taken in a shuffled order per epoch and each goes into the first row with room
for it (first-fit, within windows of `WINDOW` documents so that time and memory stay bounded
on millions of documents). The rest of a row is padding: its targets are not counted and it is
a document of its own, so no real token attends to it.

A batch is (inputs, targets, documents), int64 [rows, seq_len] each: targets are `IGNORE`
where no loss is taken (padding, prompt tokens of a chat sample), documents number the
documents of a row (`model.transformer.document_mask`). Like `BatchSampler`, step s's global
batch is a pure function of (seed, s), every data-parallel rank takes its slice of it, and
the whole state is the step: a run resumes bit-exact, also under another data-parallel size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from supercluster.data.mixture import IGNORE  # noqa: F401 (a target that is not counted; packing's name too)
from supercluster.data.sampler import StepSampler
from supercluster.errors import UserError

if TYPE_CHECKING:
    import torch

WINDOW = 8192  # documents packed together; rows from one window are closed before the next


def first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, each into the first bin with room."""
    bins: list[list[int]] = []
    room = np.empty(0, dtype=np.int64)
    for i, n in enumerate(lengths):
        fits = np.flatnonzero(room >= n)
        if len(fits):
            bins[fits[0]].append(i)
            room[fits[0]] -= n
        else:
            bins.append([i])
            room = np.append(room, capacity - n)
    return bins


class PackedSampler(StepSampler):
    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, loss_mask: np.ndarray | None, seq_len: int,
                 batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, name: str = "training",
                 documents: np.ndarray | None = None):
        """`documents`: the indices of the documents this split uses (default all)."""
        if batch_size % dp_size:
            raise UserError(f"The global batch of {batch_size} sequences does not divide over {dp_size} data-parallel "
                            f"ranks; use a multiple of {dp_size}.")
        self.tokens, self.offsets, self.loss_mask = tokens, np.asarray(offsets, dtype=np.int64), loss_mask
        self.seq_len, self.batch_size, self.dp_rank, self.dp_size, self.seed = seq_len, batch_size, dp_rank, dp_size, seed
        chosen = np.arange(len(self.offsets) - 1) if documents is None else np.sort(np.asarray(documents, dtype=np.int64))
        starts, full = self.offsets[chosen], self.offsets[chosen + 1] - self.offsets[chosen] - 1
        self.truncated = int((full > seq_len).sum())
        if loss_mask is None and self.truncated:
            # Plain text: a long document continues in pieces of seq_len pairs, each starting where the
            # previous one's last target is (every target once); chat samples are cut instead (below).
            pieces = np.maximum(1, -(-full // seq_len))
            first = np.repeat(np.cumsum(pieces) - pieces, pieces)
            k = np.arange(int(pieces.sum())) - first
            starts = np.repeat(starts, pieces) + k * seq_len
            full = np.repeat(full, pieces) - k * seq_len
            self.truncated = 0
        lengths = np.minimum(full, seq_len)  # (input, target) pairs of each document
        keep = lengths > 0
        if loss_mask is not None:  # a sample whose answer was cut off entirely teaches nothing
            keep &= np.array([bool(n > 0 and loss_mask[o + 1:o + 1 + n].any()) for o, n in zip(starts, lengths)], dtype=bool)
        self.starts = starts[keep]
        self.lengths = lengths[keep]
        if not len(self.starts):
            raise UserError(f"The {name} split has no document with a target to learn (each needs 2 tokens, and chat "
                            f"samples an assistant turn within train.seq_len = {seq_len}); add data or raise train.seq_len.")
        self.step = 0
        self._epochs: list[list[list[int]]] = []  # each epoch's rows (lists of indices into self.starts)
        self._starts = [0]  # global index of each epoch's first row

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            order = np.random.default_rng([self.seed, e]).permutation(len(self.starts))
            rows = []
            for w in range(0, len(order), WINDOW):
                chunk = order[w:w + WINDOW]
                rows += [[int(chunk[j]) for j in b] for b in first_fit(self.lengths[chunk], self.seq_len)]
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        return self._epochs[epoch]

    def row(self, index: int) -> list[int]:
        epoch = 0
        while True:
            rows = self.epoch_rows(epoch)
            if index < self._starts[epoch + 1]:
                return rows[index - self._starts[epoch]]
            epoch += 1

    @property
    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(0))

    def build(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.seq_len
        x = np.zeros((len(rows), s), dtype=np.int64)
        y = np.full((len(rows), s), IGNORE, dtype=np.int64)
        docs = np.full((len(rows), s), -1, dtype=np.int64)  # padding: a document of its own
        for r, members in enumerate(rows):
            at = 0
            for k, j in enumerate(members):
                start, n = int(self.starts[j]), int(self.lengths[j])
                window = np.asarray(self.tokens[start:start + n + 1], dtype=np.int64)
                x[r, at:at + n] = window[:-1]
                target = window[1:]
                if self.loss_mask is not None:
                    target = np.where(np.asarray(self.loss_mask[start + 1:start + n + 1]) > 0, target, IGNORE)
                y[r, at:at + n] = target
                docs[r, at:at + n] = k
                at += n
        return x, y, docs

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's slice of step `step`'s global batch: (inputs, targets, documents)."""
        import torch

        b = self.batch_size // self.dp_size
        first = step * self.batch_size + self.dp_rank * b
        arrays = self.build([self.row(i) for i in range(first, first + b)])
        return tuple(torch.from_numpy(a) for a in arrays)


def packed_eval_batches(sampler: PackedSampler, num_batches: int | None = None) -> Iterator:
    """One pass over the split's first epoch, each document once, in at most `num_batches` global
    batches (all of them with None); the last batch is filled up with rows of padding, which
    count no target, so every data-parallel rank runs the same number of batches."""
    rows = sampler.epoch_rows(0)
    steps = -(-len(rows) // sampler.batch_size)
    b = sampler.batch_size // sampler.dp_size
    import torch

    for step in range(steps if num_batches is None else min(num_batches, steps)):
        first = step * sampler.batch_size + sampler.dp_rank * b
        members = [rows[i] if i < len(rows) else [] for i in range(first, first + b)]
        yield tuple(torch.from_numpy(a) for a in sampler.build(members))
