"""Export a run's latest checkpoint, whatever layout trained it, to one safetensors file
with Llama (Hugging Face) tensor names, so other tools can load the model.

DCP reshards the checkpoint into one plain model on this process; the names are then
mapped (`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`, ...,
see `model.weights`).
RoPE here rotates the two halves of each head (x[:d/2], x[d/2:]), the convention of
Hugging Face's Llama, so q and k need no permutation. The file's metadata holds the model
config (`supercluster_config`) and a Hugging Face style `config` for loaders that want one.
"""

from __future__ import annotations

import json
from pathlib import Path

from supercluster.errors import UserError
from supercluster.files import atomic_path
from supercluster.model.weights import llama_name


def hf_config(cfg) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32",
    }


def export_run(run_dir: Path, out: Path) -> dict:
    """Write `out` (.safetensors) from the run's latest checkpoint; returns a summary."""
    from dataclasses import asdict

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from supercluster.train.sample import load_trained

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"The export file {str(out)!r} must end in .safetensors.")
    model = load_trained(Path(run_dir))
    cfg = model.cfg
    # Tied embeddings: one tensor, stored once under the embedding's name (as Hugging Face does).
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    tensors = {llama_name(name): tensor for name, tensor in state.items()}
    metadata = {"format": "pt", "supercluster_config": json.dumps(asdict(cfg))}
    if cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.position == "rope" and not cfg.bias:
        metadata["config"] = json.dumps(hf_config(cfg))
    try:
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as err:  # the Rust writer's I/O errors (a full disk) come as its own type
        raise UserError(f"Cannot write {str(out)!r} ({err}); free some space or pick another path.") from None
    return {"path": str(out), "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "bytes": out.stat().st_size, "llama_compatible": "config" in metadata}
