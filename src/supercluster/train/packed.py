"""The loss of packed, loss-masked batches (chat fine-tuning): the mean over the targets that
count, taken over the whole global batch rather than per microbatch or per rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from supercluster.data.packing import IGNORE


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
