"""Hugging Face model folders of the Llama architecture and the Mixtral and Qwen3-MoE
Mixture-of-Experts ones: `config.json`, `*.safetensors`, `tokenizer.json`, and the chat template
from `tokenizer_config.json` (or `chat_template.jinja`).

Hugging Face Llama rotates the two halves of each head, as this project does, so the
weights need only their names changed (`model.weights.supercluster_name`); the experts, stored
one by one ([out, in] linears), are stacked into this model's [experts, in, out] tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from supercluster.errors import UserError
from supercluster.model.config import ModelConfig
from supercluster.model.weights import supercluster_name
from supercluster.serve.importers import ImportedModel


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err}).") from None


def _model_config(folder: Path, hf: dict) -> ModelConfig:
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise UserError(f"{str(folder)!r} holds a {kind!r} model; only the {', '.join(ARCHITECTURES)} architectures "
                        f"can be imported.")
    # transformers 5 writes rope_theta inside rope_parameters; older versions at the top level.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    unsupported = [("RoPE scaling", bool(scaling)), ("attention biases", hf.get("attention_bias")),
                   ("MLP biases", hf.get("mlp_bias")), (f"the {hf.get('hidden_act')} activation", hf.get("hidden_act", "silu") != "silu")]
    for what, present in unsupported:
        if present:
            raise UserError(f"{str(folder)!r} uses {what}, which this model does not implement; it cannot be imported.")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if kind != "qwen3_moe" and hf.get("head_dim") not in (None, hidden // heads):
        raise UserError(f"{str(folder)!r} has head_dim {hf['head_dim']}; this model needs hidden_size / num_attention_heads.")
    return ModelConfig(**_moe_fields(folder, kind, hf),
        layers=int(hf["num_hidden_layers"]), hidden=hidden, heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads), ffn_hidden=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]), max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    ).validate()


ARCHITECTURES = ("llama", "mixtral", "qwen3_moe")


def _moe_fields(folder: Path, kind: str, hf: dict) -> dict:
    if kind == "llama":
        return {}
    experts = int(hf.get("num_local_experts") or hf["num_experts"])
    out = dict(moe_experts=experts, moe_top_k=int(hf["num_experts_per_tok"]),
               moe_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0))
    if kind == "mixtral":
        return {**out, "moe_hidden": int(hf["intermediate_size"])}
    if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
        raise UserError(f"{str(folder)!r} mixes dense and MoE layers (decoder_sparse_step, mlp_only_layers) in a "
                        f"pattern this model does not implement; it cannot be imported.")
    return {**out, "moe_hidden": int(hf["moe_intermediate_size"]), "moe_norm_topk": bool(hf.get("norm_topk_prob")),
            "qk_norm": True, "head_dim": int(hf.get("head_dim") or hidden_size_over_heads(hf))}


def hidden_size_over_heads(hf: dict) -> int:
    return int(hf["hidden_size"]) // int(hf["num_attention_heads"])


# One expert's linear, Mixtral's (block_sparse_moe.experts.E.w1) or Qwen3-MoE's (mlp.experts.E.gate_proj) names.
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|down_proj|up_proj)\.weight$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
_OURS = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2"}


def _stack_experts(cfg: ModelConfig, experts: dict, tensors: dict) -> None:
    """Per-expert [out, in] linears -> our stacked [E, in, out]; the balancing bias starts at zero."""
    import torch

    for (layer, ours), by_index in sorted(experts.items()):
        if sorted(by_index) != list(range(cfg.moe_experts)):
            raise UserError(f"Layer {layer}'s {ours} weights are there for {len(by_index)} experts, not the "
                            f"{cfg.moe_experts} its config names; it cannot be imported.")
        tensors[f"layers.{layer}.feed_forward.experts.{ours}"] = torch.stack(
            [by_index[e].transpose(0, 1) for e in range(cfg.moe_experts)])
    for layer in range(cfg.layers):
        if cfg.moe_layer(layer):
            tensors[f"layers.{layer}.feed_forward.router.expert_bias"] = torch.zeros(cfg.moe_experts)


def _tensors(folder: Path, cfg: ModelConfig) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{str(folder)!r} has no *.safetensors weights (PyTorch .bin files are not read); "
                        f"save the model with safe_serialization.")
    tensors, experts = {}, {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{str(file)!r} could not be read ({err}).") from None
        for name, tensor in loaded.items():
            if name.endswith("rotary_emb.inv_freq"):  # a cache some versions saved; recomputed here
                continue
            if cfg.is_moe and (match := _EXPERT.match(name)):
                layer, index, kind = match.groups()
                experts.setdefault((int(layer), _OURS[kind]), {})[int(index)] = tensor
                continue
            if cfg.is_moe and (match := _ROUTER.match(name)):
                tensors[f"layers.{match.group(1)}.feed_forward.router.gate.weight"] = tensor
                continue
            try:
                tensors[supercluster_name(name)] = tensor
            except KeyError:
                raise UserError(f"{str(file)!r} has a tensor {name!r} that a Llama model has no place for; "
                                f"it cannot be imported.") from None
    if cfg.is_moe:
        _stack_experts(cfg, experts, tensors)
    if cfg.tie_embeddings:
        tensors.pop("output.weight", None)
    return tensors


def _special_ids(folder: Path, hf: dict, tokenizer) -> dict:
    generation = folder / "generation_config.json"
    gen = _read_json(generation) if generation.is_file() else {}
    config = folder / "tokenizer_config.json"
    tok_cfg = _read_json(config) if config.is_file() else {}

    def ids(value) -> list[int]:
        if value is None:
            return []
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content")
        if isinstance(value, str):
            found = tokenizer.token_to_id(value)
            return [found] if found is not None else []
        return [int(v) for v in value] if isinstance(value, list) else [int(value)]

    def first(*values):
        return next((i for v in values for i in ids(v)), None)

    eos = list(dict.fromkeys(ids(gen.get("eos_token_id")) + ids(hf.get("eos_token_id")) + ids(tok_cfg.get("eos_token"))))
    return {"bos": first(gen.get("bos_token_id"), hf.get("bos_token_id"), tok_cfg.get("bos_token")), "eos": eos,
            "pad": first(gen.get("pad_token_id"), hf.get("pad_token_id"), tok_cfg.get("pad_token"))}


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    template = _read_json(config).get("chat_template") if config.is_file() else None
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def read_hf_folder(folder: Path) -> ImportedModel:
    from tokenizers import Tokenizer

    if not (folder / "config.json").is_file():
        raise UserError(f"{str(folder)!r} is not a Hugging Face model folder (it has no config.json).")
    hf = _read_json(folder / "config.json")
    try:
        cfg = _model_config(folder, hf)
    except KeyError as err:
        raise UserError(f"{str(folder / 'config.json')!r} lacks {err.args[0]!r}, which a Llama config has.") from None
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{str(folder)!r} has no tokenizer.json; save the model's fast tokenizer there too.")
    tokenizer_json = (folder / "tokenizer.json").read_text()
    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise UserError(f"{str(folder / 'tokenizer.json')!r} is not a valid tokenizers file ({err}).") from None
    return ImportedModel(cfg, _tensors(folder, cfg), tokenizer_json, _chat_template(folder),
                         name=folder.name, **_special_ids(folder, hf, tokenizer))
