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

from supercluster.serve.kernels import paged_decode_attention


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
        # Decoding rows attend straight from the blocks with supercluster's C++ kernel where it
        # builds (fp32 pools on CPUs; built here, at load, not on the first request).
        self.decode_kernel = paged_decode_attention() if device.type == "cpu" and dtype == torch.float32 else None

    @staticmethod
    def blocks_for_budget(gib: float, layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        per_block = 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        return max(1, int(gib * 2**30 // per_block))

    def slots(self, block_table: list[int], start: int, stop: int) -> torch.Tensor:
        """Flat slot indices of token positions [start, stop) of a sequence."""
        bs = self.block_size
        positions = torch.arange(start, stop)
        return torch.tensor(block_table, dtype=torch.long)[positions // bs] * bs + positions % bs


@dataclass
class SeqSlice:
    """One sequence's share of a packed step: its new tokens and its whole context."""

    start: int  # offset of its new tokens in the packed batch
    count: int  # new tokens this step
    context: int  # tokens in the cache after this step (positions 0..context-1)
    key_slots: torch.Tensor  # slot of every context position


class StepAttention:
    """The `cache` one forward pass of the engine hands the model: packed tokens of many
    sequences in one [1, T] batch, each attending only to its own context.

    Sequences with a single new token (decoding) attend in one padded call per layer; the padded
    keys are masked out, so each row still sees exactly its own context. Prefill chunks attend
    one sequence at a time with their causal mask."""

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, seqs: list[SeqSlice]):
        self.cache, self.write_slots = cache, write_slots
        self.prefills = [seq for seq in seqs if seq.count > 1]
        decodes = [seq for seq in seqs if seq.count == 1]
        self.decode_rows = None
        self.decode_only = not self.prefills  # then the packed tokens are the decode rows, in order
        if decodes:
            # Built once per step, shared by every layer.
            longest = max(seq.context for seq in decodes)
            self.decode_rows = torch.tensor([seq.start for seq in decodes], device=write_slots.device)
            self.decode_slots = torch.zeros(len(decodes), longest, dtype=torch.long, device=write_slots.device)
            for i, seq in enumerate(decodes):
                self.decode_slots[i, :seq.context] = seq.key_slots
            lengths = self.decode_lengths = torch.tensor([seq.context for seq in decodes], device=write_slots.device)
            self.decode_mask = (torch.arange(longest, device=write_slots.device)[None, :] < lengths[:, None])[:, None, None, :]
            # One sequence whose blocks lie end to end in the pool (the usual case for a lone
            # request) reads its keys and values as a view: no gather at every layer.
            self.decode_span = None
            if len(decodes) == 1:
                first = int(decodes[0].key_slots[0])
                if torch.equal(decodes[0].key_slots, torch.arange(first, first + longest)):
                    self.decode_span = (first, first + longest)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [1, T, heads, d] for the packed tokens; returns [1, T, heads, d]."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        k_pool.index_copy_(0, self.write_slots, k[0] if k.dtype == k_pool.dtype else k[0].to(k_pool.dtype))
        v_pool.index_copy_(0, self.write_slots, v[0] if v.dtype == v_pool.dtype else v[0].to(v_pool.dtype))
        gqa = q.shape[2] != k_pool.shape[1]
        if self.decode_only:
            return self._decode(q[0][:, :, None], k_pool, v_pool, gqa)[None]
        out = torch.empty_like(q)
        for seq in self.prefills:
            # One sequence at a time: its result never depends on which others share the step.
            qs = q[0, seq.start:seq.start + seq.count].transpose(0, 1)  # [heads, n, d]
            ks = k_pool.index_select(0, seq.key_slots).transpose(0, 1).to(q.dtype)  # [kv_heads, L, d]
            vs = v_pool.index_select(0, seq.key_slots).transpose(0, 1).to(q.dtype)
            # query i sits at position context-count+i and sees keys up to it
            q_pos = torch.arange(seq.context - seq.count, seq.context, device=q.device)
            mask = torch.arange(seq.context, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, enable_gqa=gqa)
            out[0, seq.start:seq.start + seq.count] = o[0].transpose(0, 1).to(out.dtype)  # autocast may answer in bf16
        if self.decode_rows is not None:
            out[0, self.decode_rows] = self._decode(q[0, self.decode_rows][:, :, None], k_pool, v_pool, gqa)
        return out

    def _decode(self, qs: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Every decoding sequence's one query [B, heads, 1, d] against its context: [B, heads, d]."""
        if self.cache.decode_kernel is not None and qs.dtype == k_pool.dtype == torch.float32:
            return self.cache.decode_kernel(qs[:, :, 0].contiguous(), k_pool, v_pool, self.decode_slots,
                                            self.decode_lengths, qs.shape[-1] ** -0.5)
        # index_select on the flat slots: several times faster on CPUs than 2-D fancy indexing
        if self.decode_span is not None:
            ks, vs = k_pool[slice(*self.decode_span)][None], v_pool[slice(*self.decode_span)][None]
        else:
            ks = k_pool.index_select(0, self.decode_slots.flatten()).unflatten(0, self.decode_slots.shape)
            vs = v_pool.index_select(0, self.decode_slots.flatten()).unflatten(0, self.decode_slots.shape)
        ks, vs = ks.transpose(1, 2), vs.transpose(1, 2)  # [B, kv_heads, L, d]
        if ks.dtype != qs.dtype:
            ks, vs = ks.to(qs.dtype), vs.to(qs.dtype)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=self.decode_mask, enable_gqa=gqa)[:, :, 0]
        return o if o.dtype == qs.dtype else o.to(qs.dtype)  # autocast may answer in bf16
