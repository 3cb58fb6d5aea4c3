"""Model weights as one safetensors file, and the Hugging Face Llama names of our tensors.

An imported model's run directory holds `weights.safetensors` with this project's own
parameter names (`Transformer.state_dict()` keys) in fp32; exporting and importing Hugging
Face checkpoints go through the name mapping here. RoPE in this project rotates the two
halves of each head (x[:d/2], x[d/2:]), Hugging Face Llama's convention, so q and k keep
their layout in both directions.
"""

from __future__ import annotations

import re
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import atomic_path

WEIGHTS_FILE = "weights.safetensors"

_BLOCK = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",  # Qwen3
}
_TOP = {"tok_embeddings": "model.embed_tokens", "pos_embeddings": "model.embed_positions",
        "norm": "model.norm", "output": "lm_head"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = {v: k for k, v in _BLOCK.items()}
_HF_TOP = {v: k for k, v in _TOP.items()}


def llama_name(name: str) -> str:
    """supercluster parameter name -> Hugging Face Llama name."""
    match = _LAYER.match(name)
    if match:
        layer, module, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK[module]}.{kind}"
    module, _, kind = name.rpartition(".")
    return f"{_TOP[module]}.{kind}"


def supercluster_name(name: str) -> str:
    """The inverse of `llama_name`; KeyError for a tensor this model has no place for."""
    match = _HF_LAYER.match(name)
    if match:
        layer, module, kind = match.groups()
        return f"layers.{layer}.{_HF_BLOCK[module]}.{kind}"
    module, _, kind = name.rpartition(".")
    if module not in _HF_TOP or kind not in ("weight", "bias"):
        raise KeyError(name)
    return f"{_HF_TOP[module]}.{kind}"


def stored_names(model) -> list[str]:
    """The state-dict keys a weights file holds: a tied output head is the embedding, stored once."""
    names = list(model.state_dict())
    return [n for n in names if not (model.cfg.tie_embeddings and n == "output.weight")]


def save_weights(tensors: dict, path: Path) -> None:
    """Write `tensors` (our names) as fp32 safetensors, atomically (a temporary file, then rename)."""
    import torch
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})


def load_weights(path: Path, model) -> None:
    """Fill `model` (any device, meta-built then materialized is fine) from a weights file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"Weights file {str(path)!r} could not be read ({err}); import the model again.") from None
    expected = model.state_dict()
    wanted = set(stored_names(model))
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    wrong = [k for k in wanted & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                else f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model {tuple(expected[wrong[0]].shape)}")
        raise UserError(f"Weights file {str(path)!r} does not fit the model in config.toml ({what}); import the model again.")
    model.load_state_dict(tensors, strict=False)  # a tied head follows the embedding it shares


def imported_tokenizer(run_dir: Path) -> Path | None:
    """An imported run's tokenizer, which any text it trains on must be encoded with (the
    weights were learned with it); None for a run that trains its own."""
    run_dir = Path(run_dir)
    path = run_dir / "tokenizer.json"
    return path if (run_dir / WEIGHTS_FILE).is_file() and path.is_file() else None
