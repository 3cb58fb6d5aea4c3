"""Context parallelism: each rank of the cp group holds a slice of every sequence.

The sequence is cut into 2 x cp chunks and rank r keeps chunks r and 2cp-1-r, so under
a causal mask every rank does the same amount of attention work (an early chunk, cheap,
paired with a late one, expensive). Everything but attention is per token and needs no
communication. Attention gathers the keys and values of the whole sequence from the cp
group with an autograd-aware all-gather (its backward is a reduce-scatter of their
gradients), and masks by absolute position: the design Llama 3 trained its 405B model
with. It runs on any backend, gloo on CPU included, where torch 2.13's ring-attention
`context_parallel` has no CPU kernel.

The same object tells the model which absolute positions its tokens have (RoPE or learned
positions), also when there is no context parallelism (pipeline stages need it too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_tensor_autograd


class SequenceSharding:
    """The positions of the sequence this rank holds, and how to take them from a batch."""

    def __init__(self, seq_len: int, device, cp_mesh=None):
        self.cp_mesh = cp_mesh
        self.size = cp_mesh.size() if cp_mesh is not None else 1
        self.rank = cp_mesh.get_local_rank() if cp_mesh is not None else 0
        self.positions = self.chunk_positions(seq_len, self.rank, self.size).to(device)
        # Keys arrive in all-gather order: rank 0's positions, then rank 1's, ...
        self.key_positions = torch.cat([self.chunk_positions(seq_len, r, self.size) for r in range(self.size)]).to(device)

    @staticmethod
    def chunk_positions(seq_len: int, rank: int, size: int) -> torch.Tensor:
        if size == 1:
            return torch.arange(seq_len)
        chunk = seq_len // (2 * size)
        early, late = rank * chunk, (2 * size - 1 - rank) * chunk
        return torch.cat([torch.arange(early, early + chunk), torch.arange(late, late + chunk)])

    def shard(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """This rank's tokens of each [batch, seq] tensor (all of them without cp)."""
        if self.size == 1:
            return list(tensors)
        return [t[:, self.positions.to(t.device)] for t in tensors]

    def attention(self, q, k, v, is_causal: bool):
        """Causal attention of this rank's queries over the keys and values of the whole group."""
        group = self.cp_mesh.get_group()
        k = all_gather_tensor_autograd(k.contiguous(), gather_dim=2, group=group)
        v = all_gather_tensor_autograd(v.contiguous(), gather_dim=2, group=group)
        mask = self.key_positions[None, :] <= self.positions[:, None]  # [local queries, all keys]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def attach(self, model: torch.nn.Module) -> None:
        """Route the model's positions (and, under cp, its attention) through this sharding."""
        model.register_forward_pre_hook(self._positions_hook, with_kwargs=True)
        if self.size > 1:
            for block in model.layers.values():
                block.attention.sdpa = self.attention

    def _positions_hook(self, module, args, kwargs):
        if kwargs.get("positions") is None:
            kwargs = {**kwargs, "positions": self.positions}
        return args, kwargs
