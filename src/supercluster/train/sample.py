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


def sample_run(run_dir: Path, prompt: str, tokens: int, samples: int = 1, temperature: float = 0.8,
               top_k: int | None = 50, top_p: float | None = 0.95, seed: int = 0) -> list[str]:
    run_dir = Path(run_dir)
    model = load_trained(run_dir)
    tok_path = run_dir / "tokenizer.json"
    if tok_path.is_file():
        from supercluster.data import load_tokenizer

        tok = load_tokenizer(tok_path)
        encode, decode = (lambda s: tok.encode(s).ids), tok.decode
    else:  # a pre-tokenized corpus without its tokenizer: show token ids
        encode = lambda s: [int(t) for t in s.split()] if s.strip() else [0]  # noqa: E731
        decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = encode(prompt)
    # Decode prompt and continuation together: byte-level BPE merges across the seam
    # (a prompt's trailing space and the next word's leading one are the same character).
    return [decode(prompt_ids + generate(model, prompt_ids, tokens, temperature, top_k, top_p, gen))
            for _ in range(samples)]
