"""Prepared datasets (one, or a weighted mixture) -> a deterministic global sequence of samples.

A sample of a dataset is a window of `seq_len + 1` tokens of its token stream: sample k of
dataset d starts at token k * seq_len of d's split (consecutive windows share one token, the
last target of one being the first input of the next). Every dataset's samples are visited
in a fresh seeded permutation each epoch.

The mixture is a *global* sample sequence: global sample g -> (dataset, k), a pure function
of (seed, g). The sequence is cut into blocks of BLOCK samples; each block holds exactly
round(weight * BLOCK) samples of each dataset (largest remainders), in an order shuffled by
(seed, block). So dataset d's k-th sample is the one whose count before it is
block * quota_d + its rank inside the block, computed without walking the sequence, and
proportions hold to 1/BLOCK over every block.

Step s of training reads global samples [s*B, (s+1)*B) for the global batch B (in fact
`consumed` onwards) and data-parallel rank r takes the r-th contiguous slice. The sampler's
state is only the number of global samples consumed: a run resumes bit-exact in the middle of
an epoch, and under another data-parallel size it continues the same sequence, with no
sample repeated or skipped. The state also names the mixture it counted (each dataset's name,
size and share, and seq_len): a run resumed on another mixture, as an annealing phase does on
purpose, continues from the same count in the new sequence, and says so on stderr, because
samples of the old one may then be seen again or never.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from supercluster.data.prepared import PreparedDataset
from supercluster.errors import UserError

if TYPE_CHECKING:
    import torch

BLOCK = 8192  # samples per block of the mixture: proportions are exact to 1/BLOCK
IGNORE = -100  # target of a token outside the loss mask (torch's cross_entropy ignore_index)


@dataclass
class Split:
    """One dataset's part (train or validation): a token range and its loss mask, if any."""

    tokens: np.ndarray
    mask: np.ndarray | None
    name: str

    def n_samples(self, seq_len: int) -> int:
        return max(0, (len(self.tokens) - 1) // seq_len)


def quotas(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Samples of each dataset per block: largest-remainder rounding of weight * block."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    q = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - q), kind="stable")
    q[order[: block - int(q.sum())]] += 1
    return q


class MixtureSampler:
    def __init__(self, splits: list[Split], weights: list[float], seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, name: str = "training"):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"train.seq_len and the batch size must be positive, got {seq_len} and {batch_size}.")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"Data-parallel rank {dp_rank} is out of range for {dp_size} ranks.")
        if batch_size % dp_size:
            raise UserError(f"The global batch of {batch_size} sequences does not divide over {dp_size} data-parallel "
                            f"ranks; use a multiple of {dp_size}.")
        if seed < 0:
            raise UserError(f"The data seed must be a non-negative integer, got {seed}.")
        if len(splits) != len(weights) or not splits:
            raise ValueError("one weight per dataset")
        for split in splits:
            if split.n_samples(seq_len) < 1:
                raise UserError(f"The {name} split of {split.name!r} has {len(split.tokens)} tokens, fewer than the "
                                f"{seq_len + 1} one sequence needs; lower train.seq_len or prepare more text.")
        self.splits, self.seq_len, self.batch_size = splits, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.quota = quotas(weights)
        for split, q, w in zip(splits, self.quota, weights):
            if q == 0:
                raise UserError(f"The weight {w} of {split.name!r} is below 1/{BLOCK} of the mixture; raise it or leave the dataset out.")
        self.labels = np.repeat(np.arange(len(splits)), self.quota)
        self.sizes = [s.n_samples(seq_len) for s in splits]
        self.consumed = 0  # global samples consumed: the whole state
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._window = np.arange(seq_len + 1)
        self.has_mask = any(s.mask is not None for s in splits)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.dp_size

    def _block_arrays(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each position, its rank among that dataset's positions) in one block."""
        if self._block is None or self._block[0] != block:
            labels = np.random.default_rng([self.seed, 0, block]).permutation(self.labels)
            rank = np.empty(BLOCK, dtype=np.int64)
            for d in range(len(self.splits)):
                where = labels == d
                rank[where] = np.arange(int(where.sum()))
            self._block = (block, labels, rank)
        return self._block[1], self._block[2]

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(d)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, 1, d, epoch]).permutation(self.sizes[d]))
            self._perms[d] = cached
        return cached[1]

    def locate(self, g: int) -> tuple[int, int]:
        """Global sample g -> (dataset, sample index within that dataset's split)."""
        d, k = self.locate_many(np.asarray([g]))
        return int(d[0]), int(k[0])

    def locate_many(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`locate` for an array of global sample indices (a batch's: one or two blocks)."""
        blocks, pos = np.divmod(g, BLOCK)
        d = np.empty(len(g), dtype=np.int64)
        k = np.empty(len(g), dtype=np.int64)
        for block in np.unique(blocks):
            here = blocks == block
            labels, rank = self._block_arrays(int(block))
            d[here] = labels[pos[here]]
            k[here] = block * self.quota[d[here]] + rank[pos[here]]  # d's k-th draw overall
        sizes = np.asarray(self.sizes, dtype=np.int64)[d]
        epochs, within = np.divmod(k, sizes)
        index = np.empty(len(g), dtype=np.int64)
        for dataset, epoch in {(int(a), int(b)) for a, b in zip(d, epochs)}:
            here = (d == dataset) & (epochs == epoch)
            index[here] = self._perm(dataset, epoch)[within[here]]
        return d, index

    def global_indices(self, start: int) -> range:
        """This rank's global sample indices of the global batch that starts at `start`."""
        b = self.local_batch_size
        return range(start + self.dp_rank * b, start + (self.dp_rank + 1) * b)

    def batch_at(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (IGNORE outside a loss mask) of this rank's slice: int64 [b, seq_len]."""
        import torch

        rows = np.asarray(self.global_indices(start), dtype=np.int64)
        d, k = self.locate_many(rows)
        windows = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
        masks = np.ones_like(windows, dtype=bool) if self.has_mask else None
        for dataset in np.unique(d):
            here = np.flatnonzero(d == dataset)
            offsets = k[here, None] * self.seq_len + self._window  # fancy indexing copies out of the memmap
            split = self.splits[int(dataset)]
            windows[here] = split.tokens[offsets]
            if masks is not None and split.mask is not None:
                masks[here] = split.mask[offsets].astype(bool)
        x = torch.from_numpy(windows[:, :-1].copy())
        y = windows[:, 1:].copy()
        if masks is not None:
            y[~masks[:, 1:]] = IGNORE
        return x, torch.from_numpy(y)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch_at(self.consumed)
        self.consumed += self.batch_size
        return x, y

    def mixture(self) -> list[list]:
        """What the consumed count counts in: [name, train tokens, share of a block] per dataset, and seq_len."""
        return [[s.name, len(s.tokens), int(q)] for s, q in zip(self.splits, self.quota)] + [["seq_len", self.seq_len]]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "mixture": self.mixture()}

    def load_state_dict(self, state: dict) -> None:
        try:
            consumed, seed = int(state["consumed"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"The checkpoint's sampler state {state!r} is not a prepared-data sampler's; it needs integer "
                            f"'consumed' and 'seed' (was the run started on another kind of data?).") from None
        if consumed < 0 or seed < 0:
            raise UserError(f"The checkpoint's sampler state {state!r} has a negative count or seed.")
        saved = state.get("mixture")  # absent in checkpoints written before it was kept
        if saved is not None and saved != self.mixture() and self.dp_rank == 0:
            print(f"Resuming on another mixture than the checkpoint's ({_describe(saved)} -> {_describe(self.mixture())}): "
                  f"the run goes on from sample {consumed} of the new sequence, so samples of the old one may be seen "
                  f"again or not at all.", file=sys.stderr)
        self.consumed, self.seed = consumed, seed
        self._block, self._perms = None, {}


def _describe(mixture: list[list]) -> str:
    return ", ".join(f"{name} {share}/{BLOCK} of {tokens} tokens" for name, tokens, share in mixture[:-1]) + \
        f", seq_len {mixture[-1][1]}"


@dataclass
class PreparedData:
    """The datasets of `data.path` (a prepared folder) or `data.mix`, split into train and validation."""

    datasets: list[PreparedDataset]
    weights: list[float]
    train: list[Split]
    val: list[Split]
    source: str

    @property
    def tokenizer_path(self) -> Path | None:
        return self.datasets[0].tokenizer_path

    @property
    def vocab_size(self) -> int:
        return max(d.vocab_size for d in self.datasets)

    @property
    def train_tokens(self) -> int:
        """The smallest dataset's training tokens: what `check_splits` needs, every dataset holding a sequence."""
        return min(len(s.tokens) for s in self.train)

    @property
    def val_tokens(self) -> int:
        return min(len(s.tokens) for s in self.val)

    def sampler(self, seq_len, batch_size, dp_rank=0, dp_size=1, seed=0) -> MixtureSampler:
        return MixtureSampler(self.train, self.weights, seq_len, batch_size, dp_rank, dp_size, seed)

    def eval_batches(self, seq_len, batch_size, num_batches, dp_rank=0, dp_size=1,
                     seed=0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same validation batches on every call, drawn in the mixture's proportions."""
        sampler = MixtureSampler(self.val, self.weights, seq_len, batch_size, dp_rank, dp_size, seed, name="validation")
        for step in range(num_batches):
            yield sampler.batch_at(step * batch_size)


def check_mix(mix) -> list[dict]:
    """`data.mix`: a non-empty list of {path, weight} tables, weights positive and finite."""
    if not isinstance(mix, list) or not mix:
        raise UserError("data.mix must be a non-empty list of tables like [{path = \"DIR\", weight = 1.0}].")
    for i, entry in enumerate(mix):
        if not isinstance(entry, dict):
            raise UserError(f"data.mix[{i}] must be a table like {{path = \"DIR\", weight = 1.0}}, got {entry!r}.")
        unknown = sorted(set(entry) - {"path", "weight"})
        if unknown:
            raise UserError(f"data.mix[{i}] has {', '.join(map(repr, unknown))}, which a mixture does not read; it takes path and weight.")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise UserError(f"data.mix[{i}] needs a path (a prepared dataset folder).")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise UserError(f"data.mix[{i}].weight must be a positive number, got {weight!r}.")
    return mix


def uses_prepared(data) -> bool:
    """Whether a run's `data` section names prepared datasets (data.mix, or data.path at a prepared folder)."""
    return data.mix is not None or looks_prepared(data.path)


def run_tokenizer_digest(run_dir: str | os.PathLike) -> str | None:
    """The digest of the tokenizer a run directory already has (imported, or from an earlier start), or None."""
    from supercluster.data.prepared import tokenizer_digest

    path = Path(run_dir) / "tokenizer.json"
    return tokenizer_digest(path) if path.is_file() else None


def looks_prepared(path: str | os.PathLike | None) -> bool:
    """Whether data.path names a prepared folder, finished or not (an unfinished one is then refused, not read as text)."""
    if path is None:
        return False
    p = Path(path).expanduser()
    return p.is_dir() and any((p / name).exists() for name in ("meta.json", "tokens.bin", "docs.idx"))


def open_dataset(path: str | os.PathLike, vocab_size: int, tokenizer_digest: str | None = None) -> PreparedDataset:
    """One prepared dataset, refused in one sentence unless it comes from the tokenizer of
    `tokenizer_digest` (when given) and fits a model vocabulary of `vocab_size`."""
    ds = PreparedDataset(path, tokenizer_digest)
    if ds.vocab_size > vocab_size:
        raise UserError(f"The prepared dataset {str(path)!r} has a vocabulary of {ds.vocab_size:,}, more than "
                        f"model.vocab_size {vocab_size:,}; raise model.vocab_size to at least {ds.vocab_size}.")
    return ds


def open_prepared(path: str | None, mix: list | None, val_fraction: float, vocab_size: int,
                  tokenizer_digest: str | None = None) -> PreparedData:
    """The prepared data of a run: `data.mix`, or the one folder at `data.path`.

    Every dataset must come from the same tokenizer (`tokenizer_digest`, the run's, when it
    has one) and fit the model's vocabulary. Validation is the last `val_fraction` of each
    dataset's tokens.
    """
    if mix is not None:
        if path is not None:
            raise UserError("Set data.path or data.mix, not both: a single prepared folder is a mix of one.")
        entries = check_mix(mix)
    else:
        entries = [{"path": path, "weight": 1.0}]
    datasets = []
    for entry in entries:
        ds = open_dataset(entry["path"], vocab_size, tokenizer_digest)
        tokenizer_digest = ds.digest  # the first one sets it for the others
        datasets.append(ds)
    train, val = [], []
    for entry, ds in zip(entries, datasets):
        n_val = round(ds.n_tokens * val_fraction) if val_fraction else 0
        cut = ds.n_tokens - n_val
        masks = ds.loss_masks
        train.append(Split(ds.tokens[:cut], None if masks is None else masks[:cut], entry["path"]))
        val.append(Split(ds.tokens[cut:], None if masks is None else masks[cut:], entry["path"]))
    weights = [float(e.get("weight", 1.0)) for e in entries]
    total = sum(d.n_tokens for d in datasets)
    names = ", ".join(f"{e['path']} x{w / sum(weights):.2f}" for e, w in zip(entries, weights)) if len(entries) > 1 else entries[0]["path"]
    source = f"prepared {names} ({total:,} tokens, {datasets[0].dtype.name})"
    return PreparedData(datasets, weights, train, val, source)
