"""Training on packed documents (chat fine-tuning, document masking): which runs do, their
samplers over a prepared dataset's documents, and their loss, the mean over the targets that
count taken over the whole global batch rather than per microbatch or per rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from supercluster.data.packing import IGNORE, PackedSampler
from supercluster.errors import UserError


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, denominator) -> torch.Tensor:
    """Summed cross-entropy of the counted targets (those not IGNORE), over `denominator`.

    With the denominator the count of the global batch divided by the data-parallel size, the
    gradients averaged over ranks are those of the global mean, whatever each rank's share.
    """
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss / denominator


def counted_targets(targets: torch.Tensor, group=None) -> torch.Tensor:
    """Targets that count in the global batch (summed over `group`, the data-parallel ranks)."""
    import torch.distributed as dist

    count = (targets != IGNORE).sum().to(torch.float32)
    if group is not None:
        dist.all_reduce(count, group=group)
    return count


@dataclass
class PackedData:
    """A prepared dataset read as whole documents packed into rows (chat data, or document masking)."""

    dataset: object  # data.prepared.PreparedDataset
    train: PackedSampler
    val: PackedSampler | None
    isolate: bool  # pass document ids to the model: attention stays inside each document
    train_documents: int
    val_documents: int


def packs(cfg) -> bool:
    """Whether the run reads packed documents: one prepared dataset at data.path with a loss mask
    (chat data: always packed, documents kept apart unless data.document_mask = false), or any
    under data.document_mask = true. A mixture (data.mix) reads windows of its token streams."""
    from supercluster.data.mixture import looks_prepared
    from supercluster.data.prepared import PreparedDataset

    if cfg.data.mix is not None:
        return False  # validate() refuses data.document_mask with data.mix
    prepared = looks_prepared(cfg.data.path)
    if cfg.data.document_mask and not prepared:
        raise UserError("data.document_mask needs a prepared dataset (`supercluster data prepare ... --out DIR`, then "
                        "data.path = DIR), whose document index says where each document starts.")
    if not prepared:
        return False
    return bool(cfg.data.document_mask) or PreparedDataset(cfg.data.path).has_loss_mask


def check_layout(cfg) -> None:
    if cfg.parallel.pp > 1 or cfg.parallel.cp > 1:
        raise UserError("Packed documents (chat data, data.document_mask) run without pipeline or context parallelism "
                        "for now; set parallel.pp = 1 and parallel.cp = 1 (data, tensor and FSDP parallelism work).")


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices: a seeded draw of round(n * val_fraction) documents held out."""
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    order = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def open_packed(cfg, model_vocab: int, run_dir: Path, dp_rank: int = 0, dp_size: int = 1) -> PackedData:
    """The packed train and validation samplers of the run's prepared dataset, checked against the
    run's tokenizer (when it has one) and the model's vocabulary."""
    from supercluster.data.mixture import open_dataset, run_tokenizer_digest

    check_layout(cfg)
    data = open_dataset(cfg.data.path, model_vocab, run_tokenizer_digest(run_dir))
    t = cfg.train
    train_docs, val_docs = split_documents(len(data), cfg.data.val_fraction, cfg.data.seed)
    masks = data.loss_masks
    train = PackedSampler(data.tokens, data.doc_offsets, masks, t.seq_len, t.global_batch, dp_rank, dp_size,
                          cfg.data.seed, documents=train_docs)
    val = None
    if len(val_docs) and t.eval_every:
        val = PackedSampler(data.tokens, data.doc_offsets, masks, t.seq_len, t.global_batch, dp_rank, dp_size,
                            cfg.data.seed + 1, name="validation", documents=val_docs)
    elif t.eval_every:
        raise UserError(f"The prepared dataset {cfg.data.path!r} holds too few documents to hold any out for validation "
                        f"(data.val_fraction = {cfg.data.val_fraction}); raise it, or set train.eval_every = 0.")
    isolate = cfg.data.document_mask is not False
    return PackedData(data, train, val, isolate, len(train_docs), len(val_docs))
