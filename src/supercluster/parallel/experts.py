"""Expert parallelism: each MoE layer's experts split over the `ep` ranks, tokens sent to them.

The ep ranks are neighbours carved out of dp_shard (`Layout` explains the folding): each holds
experts [r*E/ep, (r+1)*E/ep) of every MoE layer as a DTensor sharded on dim 0 over the ep mesh,
and FSDP shards those again over the dp_shard/ep ranks left over (plus dp_replicate, HSDP).

A layer's forward on one rank (`ExpertDispatcher`): its tokens, sorted by expert, go to the
ranks holding their experts with one `all_to_all_single` of uneven splits (the split sizes are
exchanged first, also by all-to-all); the received rows are regrouped by local expert for the
grouped matmul; the results go back by the reverse all-to-all. Both all-to-alls are the
autograd-aware functional collective, so backward sends the gradients the same way round.

Gradients: an expert's gradient on its rank sums the contributions of every ep peer's tokens,
while dense gradients are averaged over the data-parallel ranks and the experts' FSDP averages
only over the ranks it shards over; the experts scale their weight gradients by 1/ep
(`GroupedExperts.grad_scale`; FSDP's own divide factor needs PREMUL_SUM, which gloo lacks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import Shard, distribute_tensor

from supercluster.model.moe import moe_layers


class ExpertDispatcher:
    def __init__(self, mesh):
        self.group, self.ep = mesh.get_group(), mesh.size()

    def __call__(self, routed: torch.Tensor, counts: torch.Tensor, experts) -> torch.Tensor:
        """routed [n, hidden] sorted by global expert with counts [E]: the experts' outputs, same order."""
        local = counts.numel() // self.ep
        with torch.no_grad():
            received = torch.empty_like(counts)
            dist.all_to_all_single(received, counts, group=self.group)  # [ep sources x local experts]
        send = counts.view(self.ep, local).sum(1).tolist()
        recv = received.view(self.ep, local).sum(1).tolist()
        tokens = _wait(all_to_all_single_autograd(routed, recv, send, self.group))
        # Regroup by local expert: rows arrive as (source rank, its tokens for expert 0, 1, ...).
        expert_of = torch.repeat_interleave(torch.arange(local, device=counts.device).repeat(self.ep),
                                            received.view(-1))
        order = torch.argsort(expert_of, stable=True)
        out = experts(tokens[order], received.view(self.ep, local).sum(0))
        out = out[torch.argsort(order)]
        return _wait(all_to_all_single_autograd(out, send, recv, self.group))


def _wait(t: torch.Tensor) -> torch.Tensor:
    return t.wait() if hasattr(t, "wait") else t


def apply_expert_parallel(model: nn.Module, ep_mesh) -> list[nn.Module]:
    """Shard every MoE layer's experts over `ep_mesh` (Shard(0): whole experts per rank) and give
    the layer its dispatcher; returns the experts modules (FSDP wraps them on their own mesh)."""
    out = []
    for _, moe in moe_layers([model]):
        for name in ("w1", "w2", "w3"):
            full = getattr(moe.experts, name)
            setattr(moe.experts, name, nn.Parameter(distribute_tensor(full.detach(), ep_mesh, [Shard(0)]),
                                                    requires_grad=full.requires_grad))
        moe.dispatcher = ExpertDispatcher(ep_mesh)
        moe.experts.grad_scale = 1.0 / ep_mesh.size()
        out.append(moe.experts)
    return out


__all__ = ["ExpertDispatcher", "apply_expert_parallel"]
