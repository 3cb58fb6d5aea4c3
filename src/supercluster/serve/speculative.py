"""Prompt-lookup speculation: draft tokens for a sequence from its own earlier text.

When a model quotes, edits or repeats its context (code rewrites, extraction, summaries that
reuse phrases), the tokens after the sequence's last few ones often already appear right after an
earlier occurrence of them. The engine appends those as a draft to the sequence's next step,
gets logits at every draft position from the one forward pass, keeps the drafts the model would
have chosen itself and rolls the cache back past the first it would not (`Engine._emit`): the
same tokens as decoding one at a time, several per step when the guess is right. A decode step of
one sequence on a CPU waits on reading the weights, so a few more rows cost little.

The n-gram table is kept per sequence and grows with it, so a proposal costs a dict lookup per
n-gram size, not a scan of the context (HF's `prompt_lookup_num_tokens` scans it every step).
"""

from __future__ import annotations

MAX_DRAFT = 16  # --speculate's upper bound: a draft's rows stay a small share of a step's token budget
LONGEST_NGRAM = 4  # the longest suffix looked up first (vLLM's n-gram example sets prompt_lookup_max 4)
SHORTEST_NGRAM = 2  # one shared token is too weak a match: mostly rejected drafts, rows for nothing


class PromptLookup:
    """One sequence's drafts: where each n-gram of its tokens last occurred with a token after
    it, and how long a draft to propose next.

    The length follows Hugging Face's heuristic schedule for assistant tokens: two longer after a
    draft the model took whole, one shorter (down to one) after a miss. Free text rarely repeats,
    and a rejected draft costs its rows in the step: nothing on one sequence, whose step waits on
    reading the weights, but real work in a batch (`bench/speculative.py`)."""

    def __init__(self, most: int):
        self.most = self.length = most
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after its latest occurrence
        self.indexed = 0  # n-grams ending before this position are in the table

    def verified(self, drafted: int, accepted: int) -> None:
        """The model kept `accepted` of the last draft's `drafted` tokens: the next draft's length."""
        self.length = min(self.most, self.length + 2) if accepted == drafted else max(1, self.length - 1)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens (and at most the current draft length) that followed the latest
        earlier occurrence of the longest suffix of `tokens` (LONGEST_NGRAM down to SHORTEST_NGRAM
        tokens); [] when none occurred before."""
        # Every n-gram that has a token after it (so not the suffix itself), added once: later
        # occurrences overwrite earlier ones, the most recent context being the likeliest to repeat.
        for end in range(max(self.indexed, SHORTEST_NGRAM), len(tokens)):
            for n in range(SHORTEST_NGRAM, min(LONGEST_NGRAM, end) + 1):
                self.follows[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, len(tokens))
        k = min(k, self.length)
        draft: list[int] = []
        while len(draft) < k:
            # A match near the end continues only up to the end (a loop of period p gives p tokens):
            # look up again from the draft's own end to go on.
            text = tokens + draft if draft else tokens
            more = self._after_suffix(text, k - len(draft))
            if not more:
                break
            draft += more
        return draft

    def _after_suffix(self, text: list[int], limit: int) -> list[int]:
        for n in range(min(LONGEST_NGRAM, len(text) - 1), SHORTEST_NGRAM - 1, -1):
            after = self.follows.get(tuple(text[-n:]))
            if after is not None:
                return text[after:after + limit]
        return []
