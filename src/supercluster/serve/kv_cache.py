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

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from supercluster.serve.kernels import paged_attention


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
        # Steps attend straight on the blocks with supercluster's C++ kernel where it builds (fp32
        # or fp16 pools on CPUs; built here, at load, not on the first request).
        self.kernel = paged_attention() if device.type == "cpu" and dtype in (torch.float32, torch.float16) else None

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

    `seqs` holds, per sequence, the position of its first new token, its count of new tokens
    and its block table. With the C++ kernel (fp32 or fp16 pools on CPUs) each layer's attention
    is one call on the blocks (or, for int4 models, part of one call for all layers: `serve/fused.py`).
    Otherwise decoding sequences attend in one padded SDPA call per layer, their padded keys
    masked out, and prefill chunks one sequence at a time with their causal mask."""

    def __init__(self, cache: PagedKVCache, seqs: list[tuple[int, int, list[int]]], device: torch.device,
                 logits: list[int] = ()):
        self.cache, self.seqs, self.device = cache, seqs, device
        positions, token_seq, wanted, tables = [], [], [], []
        for i, (start, count, blocks) in enumerate(seqs):
            positions += range(start, start + count)
            token_seq += [i] * count
            # its last new token, or its last few where the step verifies drafts (speculative decoding)
            wanted += range(len(positions) - (logits[i] if logits else 1), len(positions))
            tables.append(blocks)
        widest = max(map(len, tables))
        self.positions = torch.tensor(positions, device=device)
        self.logits_index = torch.tensor(wanted, device=device)  # the packed tokens whose logits are wanted
        self.token_seq = torch.tensor(token_seq, device=device)
        self.block_tables = torch.tensor([t + [0] * (widest - len(t)) for t in tables], device=device)
        self.kernel = cache.kernel

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [1, T, heads, d] for the packed tokens, rotated; returns [1, T, heads, d]."""
        if self.kernel is not None and q.dtype == torch.float32:
            q2, k2, v2 = (t[0].reshape(t.shape[1], -1) for t in (q, k, v))
            return self.kernel(q2, k2, v2, _NO_ROPE, self.positions, self.token_seq, self.block_tables,
                               self.cache.block_size, self.cache.k[layer], self.cache.v[layer],
                               q.shape[-1] ** -0.5).view(q.shape)
        return self._attend_gathered(layer, q, k, v)

    # ---- without the kernel: gather each context and call SDPA ---------------------------------

    @functools.cached_property
    def _slices(self) -> tuple[torch.Tensor, list[SeqSlice]]:
        write_slots, slices, offset = [], [], 0
        for start, count, blocks in self.seqs:
            write_slots.append(self.cache.slots(blocks, start, start + count))
            slices.append(SeqSlice(offset, count, start + count, self.cache.slots(blocks, 0, start + count).to(self.device)))
            offset += count
        return torch.cat(write_slots).to(self.device), slices

    @functools.cached_property
    def _decode_layout(self):
        """Built once per step, shared by every layer: the decoding rows, their slots padded to the
        longest context, the lengths and the padding mask."""
        decodes = [seq for seq in self._slices[1] if seq.count == 1]
        if not decodes:
            return None
        longest = max(seq.context for seq in decodes)
        rows = torch.tensor([seq.start for seq in decodes], device=self.device)
        slots = torch.zeros(len(decodes), longest, dtype=torch.long, device=self.device)
        for i, seq in enumerate(decodes):
            slots[i, :seq.context] = seq.key_slots
        lengths = torch.tensor([seq.context for seq in decodes], device=self.device)
        mask = (torch.arange(longest, device=self.device)[None, :] < lengths[:, None])[:, None, None, :]
        return rows, slots, mask

    def _attend_gathered(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        write_slots, slices = self._slices
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        k_pool.index_copy_(0, write_slots, k[0] if k.dtype == k_pool.dtype else k[0].to(k_pool.dtype))
        v_pool.index_copy_(0, write_slots, v[0] if v.dtype == v_pool.dtype else v[0].to(v_pool.dtype))
        gqa = q.shape[2] != k_pool.shape[1]
        out = torch.empty_like(q)
        for seq in slices:
            if seq.count == 1:
                continue
            # One sequence at a time: its result never depends on which others share the step.
            qs = q[0, seq.start:seq.start + seq.count].transpose(0, 1)  # [heads, n, d]
            ks = k_pool.index_select(0, seq.key_slots).transpose(0, 1).to(q.dtype)  # [kv_heads, L, d]
            vs = v_pool.index_select(0, seq.key_slots).transpose(0, 1).to(q.dtype)
            # query i sits at position context-count+i and sees keys up to it
            q_pos = torch.arange(seq.context - seq.count, seq.context, device=q.device)
            mask = torch.arange(seq.context, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, enable_gqa=gqa)
            out[0, seq.start:seq.start + seq.count] = o[0].transpose(0, 1).to(out.dtype)  # autocast may answer in bf16
        if self._decode_layout is not None:
            rows, slots, mask = self._decode_layout
            # index_select on the flat slots: several times faster on CPUs than 2-D fancy indexing
            ks = k_pool.index_select(0, slots.flatten()).unflatten(0, slots.shape).transpose(1, 2)  # [B, kv_heads, L, d]
            vs = v_pool.index_select(0, slots.flatten()).unflatten(0, slots.shape).transpose(1, 2)
            if ks.dtype != q.dtype:
                ks, vs = ks.to(q.dtype), vs.to(q.dtype)
            o = F.scaled_dot_product_attention(q[0, rows][:, :, None], ks, vs, attn_mask=mask, enable_gqa=gqa)[:, :, 0]
            out[0, rows] = o.to(out.dtype)  # autocast may answer in bf16
        return out


_NO_ROPE = torch.empty(0)  # q and k come rotated
