"""What runs the model for the engine: one step's packed batch in, each sequence's last logits out
(its last few, for a sequence whose step verifies draft tokens).

The engine's scheduler decides what a step computes and describes it as a `StepBatch` of plain
Python values; a runner turns that into tensors, hands the model its `StepAttention` and returns
the logits. `LocalRunner` does it in this process; the tensor-parallel runner
(`supercluster.serve.tensor_parallel`) sends the same batch to its other ranks first, and each
rank runs this same code on its share of the heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from supercluster.serve.fused import FusedDecoder
from supercluster.serve.kv_cache import PagedKVCache, StepAttention


@dataclass
class StepBatch:
    """One forward pass: small enough to pickle to every rank each step."""

    tokens: list[int]  # every sequence's new tokens, packed in order
    seqs: list[tuple[int, int, list[int]]]  # per sequence: position of its first new token, new tokens, block table
    logits: list[int] = field(default_factory=list)  # per sequence: logits of its last this many tokens (none given: 1)


class LocalRunner:
    """The model and its KV cache in this process.

    On a CPU, steps of a few tokens (decoding one to a few sequences) run on one thread: there a
    step is bound by reading the weights, a second thread gains little, and it takes the core the
    HTTP server needs for every token it streams. Measured through `bench/serve.py` on a 2-core
    Zen 4 with `--quantize int4`: one stream at 7.6-8.2 ms a token on one thread against 8.4-9.8 ms
    on two. Bigger steps use every thread.

    int4 Llama-style models run their layers as one C++ call (`serve/fused.py`); others run the
    model's own forward with the step's `StepAttention` as its cache.
    """

    FEW_TOKENS = 4

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, device: torch.device):
        self.model, self.cache, self.device = model, cache, device
        self.threads = torch.get_num_threads()
        self.fused = FusedDecoder(model, cache) if FusedDecoder.supports(model, cache) else None

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """Logits [rows, vocab]: each sequence's last `batch.logits` new tokens (its last one by default), in order."""
        cache = StepAttention(self.cache, batch.seqs, self.device, batch.logits)
        if self.device.type == "cpu":
            threads = 1 if len(batch.tokens) <= self.FEW_TOKENS else self.threads
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        tokens = torch.tensor(batch.tokens, device=self.device)
        if self.fused is not None:
            return self.fused(tokens, cache)
        return self.model(tokens[None], cache.positions, cache=cache, logits_index=cache.logits_index)[0]

    def problem(self) -> str:
        """Why this runner cannot run a step, or "" when it can."""
        return ""

    def close(self) -> None:
        pass
