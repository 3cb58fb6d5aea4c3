"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step, running sequences go first (a decoding one needs one token, a long prompt gets a
chunk of what is left of the token budget, so it never stalls the others), then waiting ones
are admitted while the budget, the running limit and the KV blocks allow. A new sequence
starts from the longest prefix of its prompt already in the cache. When a running sequence
needs a block and none is free, the youngest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed later (vLLM's recompute
preemption).

With speculative decoding on, a sequence whose step ends its known tokens may get draft tokens
appended (`propose`), from what is left of the step's budget and of the free blocks once every
sequence's own tokens are in: drafts never delay another sequence or preempt one. `rollback`
then shrinks a sequence back to the tokens its step verified.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from supercluster.serve.kv_cache import BlockPool, block_hashes
from supercluster.serve.sampling import SamplingParams


@dataclass
class Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    emit: object  # callable(event dict), called from the engine thread
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    published: int = 0  # full blocks offered to the prefix cache
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    text: str = ""  # detokenized output so far
    detokenizer: object | None = None  # serve/tokens.py's Detokenizer: the text one token at a time
    matcher: object | None = None  # the constrained request's grammar state (serve/structured.py)
    draft: list[int] = field(default_factory=list)  # tokens guessed after `tokens`, verified in this step
    lookup: object | None = None  # serve/speculative.py's PromptLookup: its drafts, where it speculates
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None
    aborted: bool = False
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_running: int, max_step_tokens: int, propose=None):
        self.pool, self.block_size = pool, block_size
        self.propose = propose  # callable(sequence, most tokens) -> draft tokens, or None: no speculation
        self.max_running, self.max_step_tokens = max_running, max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.computed, seq.published = [], 0, 0

    def _grow(self, seq: Sequence, upto: int) -> bool:
        """Blocks for token positions below `upto`; False (nothing taken) when the pool is short."""
        need = -(-upto // self.block_size) - len(seq.blocks)
        if need > self.pool.available():
            return False
        seq.blocks += [self.pool.allocate() for _ in range(need)]
        return True

    def _preempt_youngest(self) -> Sequence:
        victim = max(self.running, key=lambda s: s.arrival)
        self.running.remove(victim)
        self.free(victim)
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, new tokens) pairs for the next forward pass."""
        budget, batch = self.max_step_tokens, []
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq not in self.running or budget <= 0:
                continue
            count = min(len(seq.tokens) - seq.computed, budget)
            while not self._grow(seq, seq.computed + count):
                if self._preempt_youngest() is seq:
                    break
            if seq in self.running:
                batch.append((seq, count))
                budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            tokens = seq.tokens
            # Reuse cached full blocks of the prompt, but compute at least its last token (its logits).
            hashes = block_hashes(tokens, self.block_size)[: (len(tokens) - 1) // self.block_size]
            seq.blocks = self.pool.cached_prefix(hashes)
            seq.computed = seq.published = len(seq.blocks) * self.block_size
            count = min(len(tokens) - seq.computed, budget)
            if not self._grow(seq, seq.computed + count):
                self.free(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, count))
            budget -= count
        if self.propose is not None:
            for i, (seq, count) in enumerate(batch):
                if budget <= 0:
                    break
                if seq.computed + count != len(seq.tokens):
                    continue  # mid-prompt: no logits this step to check a guess against
                draft = self.propose(seq, budget)
                if draft and self._grow(seq, seq.computed + count + len(draft)):
                    seq.draft = draft
                    batch[i] = (seq, count + len(draft))
                    budget -= len(draft)
        return batch

    def rollback(self, seq: Sequence, computed: int) -> None:
        """Keep the cache's first `computed` positions of `seq` (a rejected draft's keys and values
        lie past them) and free the blocks beyond its tokens."""
        seq.computed = computed
        keep = -(-len(seq.tokens) // self.block_size)
        self.pool.release(seq.blocks[keep:])
        del seq.blocks[keep:]

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free(seq)

    def publish_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's computed full blocks to the prefix cache (later requests that
        share the prefix, a chat's next turn for one, skip computing them)."""
        full = seq.computed // self.block_size
        if full > seq.published:
            hashes = block_hashes(seq.tokens[: full * self.block_size], self.block_size)
            for i in range(seq.published, full):
                self.pool.publish(seq.blocks[i], hashes[i])
            seq.published = full
