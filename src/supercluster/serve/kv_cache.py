"""The paged KV cache: fixed-size blocks in one pool per layer, a block table per sequence,
and prefix caching (vLLM's design, on plain torch tensors).

`BlockPool` is bookkeeping only (which block is free, who holds it, which full blocks hold
which prompt prefix); `PagedKVCache` owns the tensors; `StepAttention` is what one forward pass
of the engine hands the model as its `cache`: it writes this step's keys and values into their
slots and attends each sequence's queries to that sequence's blocks.

A full block is identified by the hash of its tokens chained to the hash of the block before
it, so equal prefixes map to equal blocks whatever request they came from. A freed block that
holds a hashed prefix stays findable until the pool needs it for something else (LRU).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def block_hashes(tokens: list[int], block_size: int) -> list[str]:
    """The chained hash of every full block of `tokens`."""
    hashes, parent = [], ""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.sha1(f"{parent}|{tokens[start:start + block_size]}".encode()).hexdigest()
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU order
        self.by_hash: dict[str, int] = {}
        self.hash_of: dict[int, str] = {}
        self.prefix_hits = 0  # blocks found in the prefix cache instead of computed

    @property
    def used(self) -> int:
        """Blocks held by at least one sequence."""
        return sum(1 for r in self.refcount if r)

    def available(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)  # the least recently freed: cached prefixes live longest
        if block in self.hash_of:
            del self.by_hash[self.hash_of.pop(block)]
        self.refcount[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.free[block] = None

    def cached_prefix(self, hashes: list[str]) -> list[int]:
        """The blocks already holding the longest run of these hashes, taken for the caller."""
        found = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            if self.refcount[block] == 0:
                del self.free[block]
            self.refcount[block] += 1
            found.append(block)
        self.prefix_hits += len(found)
        return found

    def publish(self, block: int, block_hash: str) -> None:
        """Make a full block findable by later requests with the same prefix."""
        if block_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[block_hash] = block
            self.hash_of[block] = block_hash


class PagedKVCache:
    """Keys and values of every layer in `num_blocks` blocks of `block_size` token slots."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @staticmethod
    def blocks_for_budget(gib: float, layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        per_block = 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        return max(1, int(gib * 2**30 // per_block))

    def slots(self, block_table: list[int], start: int, stop: int) -> torch.Tensor:
        """Flat slot indices of token positions [start, stop) of a sequence."""
        bs = self.block_size
        return torch.tensor([block_table[p // bs] * bs + p % bs for p in range(start, stop)], dtype=torch.long)


@dataclass
class SeqSlice:
    """One sequence's share of a packed step: its new tokens and its whole context."""

    start: int  # offset of its new tokens in the packed batch
    count: int  # new tokens this step
    context: int  # tokens in the cache after this step (positions 0..context-1)
    key_slots: torch.Tensor  # slot of every context position


class StepAttention:
    """The `cache` one forward pass of the engine hands the model: packed tokens of many
    sequences in one [1, T] batch, each attending only to its own context."""

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, seqs: list[SeqSlice]):
        self.cache, self.write_slots, self.seqs = cache, write_slots, seqs

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [1, T, heads, d] for the packed tokens; returns [1, T, heads, d]."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        k_pool.index_copy_(0, self.write_slots, k[0].to(k_pool.dtype))
        v_pool.index_copy_(0, self.write_slots, v[0].to(v_pool.dtype))
        out = torch.empty_like(q)
        for seq in self.seqs:
            # One sequence at a time: its result never depends on which others share the step.
            qs = q[0, seq.start:seq.start + seq.count].transpose(0, 1)  # [heads, n, d]
            ks = k_pool[seq.key_slots].transpose(0, 1).to(q.dtype)  # [kv_heads, L, d]
            vs = v_pool[seq.key_slots].transpose(0, 1).to(q.dtype)
            mask = None
            if seq.count > 1:  # query i sits at position context-count+i and sees keys up to it
                q_pos = torch.arange(seq.context - seq.count, seq.context)
                mask = torch.arange(seq.context)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask,
                                               enable_gqa=qs.shape[0] != ks.shape[0])
            out[0, seq.start:seq.start + seq.count] = o[0].transpose(0, 1)
        return out
