"""Per-request sampling: penalties, temperature, top-k, top-p, min-p, a seeded generator,
and the log-probabilities OpenAI's API returns (of the model's distribution, before any of
the request's shaping, as vLLM reports them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from supercluster.model.transformer import sample_token


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: over the prompt's and the output's tokens; 1: off
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    constraint: object | None = None  # a compiled grammar (serve/structured.py) the output must match


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def is_plain_greedy(params: SamplingParams) -> bool:
    """Whether `sample` would return the argmax of the logits and nothing else."""
    return (params.temperature <= 0 and params.logprobs is None and params.repetition_penalty == 1.0
            and not params.presence_penalty and not params.frequency_penalty)


def sample(logits: torch.Tensor, params: SamplingParams, generated: list[int], generator: torch.Generator | None,
           prompt: list[int] = ()) -> Sampled:
    """One token from one sequence's next-token `logits` [vocab] (a constrained request's
    arrive masked: its log-probabilities are of the tokens its grammar allows)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
    if params.repetition_penalty != 1.0 and (generated or prompt):
        seen = torch.unique(torch.tensor([*prompt, *generated]))
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.unique(torch.tensor(generated), return_counts=True)
        logits = logits.clone()
        logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    token = sample_token(logits, params.temperature, params.top_k, params.top_p, generator, params.min_p)
    if logprobs is None:
        return Sampled(token)
    top = []
    if params.logprobs:
        values, ids = torch.topk(logprobs, params.logprobs)
        top = [(int(i), float(v)) for i, v in zip(ids, values)]
    return Sampled(token, float(logprobs[token]), top)
