"""Text from a run directory's latest checkpoint, whatever layout it was trained in."""

from __future__ import annotations

from pathlib import Path

import torch

from supercluster.errors import UserError
from supercluster.model.transformer import Transformer, generate, materialize
from supercluster.model.weights import WEIGHTS_FILE, load_weights
from supercluster.train import checkpoint
from supercluster.train.config import load_config


def load_trained(run_dir: Path) -> Transformer:
    """The run's model on the CPU: from its latest checkpoint, else from an imported
    `weights.safetensors` (a run that fine-tunes imported weights has both; the checkpoint is newer)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (it has no config.toml).")
    cfg = load_config(run_dir / "config.toml")
    found = checkpoint.latest(run_dir / "checkpoints")
    weights = run_dir / WEIGHTS_FILE
    if found is None and not weights.is_file():
        raise UserError(f"Run {str(run_dir)!r} has no complete checkpoint yet; train it first.")
    # Built on the meta device: random initialisation of weights about to be overwritten
    # costs seconds at real model sizes.
    with torch.device("meta"):
        model = Transformer(cfg.model_config())
    materialize(model, "cpu")
    if found is not None:
        checkpoint.load_model_only(found[1], model)
    else:
        load_weights(weights, model)
    return model


def has_tokenizer(run_dir: Path) -> bool:
    """Runs trained on a pre-tokenized .bin without a tokenizer.json speak token ids only."""
    return (Path(run_dir) / "tokenizer.json").is_file()


def parse_token_ids(prompt: str, vocab_size: int) -> list[int]:
    """A prompt of space-separated token ids ("0 17 42"), checked against the vocabulary."""
    try:
        ids = [int(t) for t in prompt.split()]
    except ValueError:
        raise UserError(
            f"This run has no tokenizer (it was trained on pre-tokenized data), so the prompt must be "
            f"space-separated token ids such as --prompt '0 17 42', not {prompt!r}."
        ) from None
    if not ids:
        raise UserError("The prompt is empty; give at least one token id, e.g. --prompt '0'.")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"Token id {bad[0]} is outside the model's vocabulary of {vocab_size}; use ids 0..{vocab_size - 1}.")
    return ids


def sample_run(run_dir: Path, prompt: str, tokens: int, samples: int = 1, temperature: float = 0.8,
               top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0) -> list[str]:
    """Text continuations of `prompt`; for a run without a tokenizer the prompt and the
    continuations are space-separated token ids."""
    run_dir = Path(run_dir)
    model = load_trained(run_dir)
    if has_tokenizer(run_dir):
        from supercluster.data import load_tokenizer

        tok = load_tokenizer(run_dir / "tokenizer.json")
        prompt_ids, decode = tok.encode(prompt).ids, tok.decode
    else:
        prompt_ids = parse_token_ids(prompt, model.cfg.vocab_size)
        decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    # Decode prompt and continuation together: byte-level BPE merges across the seam
    # (a prompt's trailing space and the next word's leading one are the same character).
    return [decode(prompt_ids + generate(model, prompt_ids, tokens, temperature, top_k, top_p, gen))
            for _ in range(samples)]


def chat_run(run_dir: Path, prompt: str, tokens: int, samples: int = 1, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0, system: str | None = None) -> list[str]:
    """The assistant's replies to `prompt` as one user turn, rendered with the run's chat template
    (its own, or the plain one) and ended at its end-of-turn token, as the server does."""
    from supercluster.data.chat import load_chat
    from supercluster.serve.tokens import load_tokenizer_and_specials

    run_dir = Path(run_dir)
    if not has_tokenizer(run_dir):
        raise UserError(f"Run {str(run_dir)!r} has no tokenizer, so it cannot chat; sample it with token ids instead.")
    model = load_trained(run_dir)
    tok, stop = load_tokenizer_and_specials(run_dir)  # stop: the end-of-turn ids, as the server stops
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    prompt_ids = tok.encode(load_chat(run_dir, tok).render(messages, add_generation_prompt=True),
                            add_special_tokens=False).ids
    gen = torch.Generator().manual_seed(seed)
    replies = []
    for _ in range(samples):
        out = generate(model, prompt_ids, tokens, temperature, top_k, top_p, gen, stop=stop)
        replies.append(tok.decode([i for i in out if i not in stop]))
    return replies
