"""What an engine is asked to be (`EngineConfig`), checked without loading PyTorch or the model, so
that a mistyped flag of `supercluster serve` fails in a fraction of a second."""

from __future__ import annotations

from dataclasses import dataclass

from supercluster.errors import UserError
from supercluster.serve.quantizations import check as check_quantization
from supercluster.serve.speculative import MAX_DRAFT

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class EngineConfig:
    kv_cache_gib: float = 0.5
    num_blocks: int | None = None  # KV blocks, instead of sizing the pool by kv_cache_gib
    block_size: int = 16
    max_running: int = 32  # sequences decoding at once
    max_step_tokens: int = 512  # tokens per forward pass (chunked prefill beyond)
    max_queue: int = 256  # waiting requests beyond this are refused (HTTP 429)
    precision: str = "auto"  # auto: bf16 where the device runs it faster, like training
    quantize: str = "auto"  # how linear layers hold their weights: serve/quantizations.py
    tp: int = 1  # tensor-parallel CPU ranks (processes) the model is split over
    speculate: int = 0  # draft tokens per step by prompt lookup for greedy requests (0: off)

    def check(self) -> EngineConfig:
        """Itself, or one sentence naming the flag that is wrong (what needs the model is checked
        where it loads)."""
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        check_quantization(self.quantize)
        if not 0 <= self.speculate <= MAX_DRAFT:
            raise UserError(f"--speculate must be 0 (off) to {MAX_DRAFT} draft tokens, got {self.speculate}.")
        if self.tp > 1 and self.quantize not in ("none", "auto"):
            raise UserError("--quantize runs on one rank: the tensor-parallel split keeps its weights in fp32; drop --tp or --quantize.")
        return self
