"""Llama-architecture GGUF files (llama.cpp's format), dequantized to fp32 with `gguf`; Mixtral
(llama with `llama.expert_count`), Qwen3-MoE (`qwen3moe`) and OLMoE (`olmoe`) among them.

Two things differ from this project's layout besides the names:
- llama.cpp's converter permutes the rows of q and k inside each head so that RoPE rotates
  adjacent pairs (x0, x1), (x2, x3)...; our RoPE rotates the two halves of a head, as
  Hugging Face Llama does, so the permutation is undone here.
- Experts are stacked as llama.cpp's `mul_mat_id` indexes them, `ffn_gate_exps` [E, width, hidden]
  (numpy's order; ne reversed) and `ffn_down_exps` [E, hidden, width]; ours are transposed for x @ w.
  The router is `ffn_gate_inp` [E, hidden]. llama.cpp renormalises the top-k weights of Mixtral and
  Qwen3-MoE (`expert_weights_norm` where a file says otherwise), never OLMoE's, and normalises OLMoE's
  q and k over the whole projection (`attn_q_norm` [hidden]), Qwen3's per head.
- GGUF has no tokenizer.json: the vocabulary, merges, special token ids and the name of the
  pre-tokenizer are metadata, and the tokenizer is rebuilt from them with `tokenizers`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from supercluster.errors import UserError
from supercluster.model.config import ModelConfig
from supercluster.serve.importers import ImportedModel

_BLOCK = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm", "ffn_gate_inp": "feed_forward.router.gate",
    "ffn_gate_exps": "feed_forward.experts.w1", "ffn_up_exps": "feed_forward.experts.w3",
    "ffn_down_exps": "feed_forward.experts.w2",
}
ARCHITECTURES = ("llama", "qwen3moe", "olmoe")
_EXPERT_ONLY = ("qwen3moe", "olmoe")  # architectures whose every file has experts
_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}

# How each pre-tokenizer llama.cpp names (`tokenizer.ggml.pre`) splits text before BPE, as
# the original tokenizer.json of those models does it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt-2", "default"):
        return byte_level
    if pre == "smollm":  # SmolLM: every digit alone, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UserError(f"The GGUF's pre-tokenizer {pre!r} is not supported (supported: gpt-2, smollm, llama-bpe); "
                    f"import the model's Hugging Face folder instead.")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: rows (head, pair, 2) back to (head, 2, half)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> ImportedModel:
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # a truncated or foreign file fails anywhere in the parser
        raise UserError(f"{str(path)!r} is not a readable GGUF file ({type(err).__name__}: {err}).") from None
    meta = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = f.contents()
        except Exception:  # a value type this gguf version cannot decode; we never need it then
            continue
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{str(path)!r} holds a {arch!r} model; only the llama (Mixtral's too), qwen3moe and olmoe "
                        f"architectures can be imported.")
    a = arch  # every model key is prefixed with the architecture's name
    if meta.get(f"{a}.rope.scaling.type", "none") not in ("none", "") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UserError(f"{str(path)!r} uses RoPE scaling, which this model does not implement; import a model without it.")
    required = [f"{a}.attention.head_count", f"{a}.embedding_length", f"{a}.block_count"]
    required += [f"{a}.expert_count", f"{a}.expert_used_count"] if a in _EXPERT_ONLY else []
    required += [f"{a}.expert_feed_forward_length"] if a == "qwen3moe" else [f"{a}.feed_forward_length"]
    for key in required:
        if key not in meta:
            raise UserError(f"{str(path)!r} lacks the metadata key {key}, which every {a} GGUF has; the file is incomplete.")
    heads = int(meta[f"{a}.attention.head_count"])
    hidden = int(meta[f"{a}.embedding_length"])
    kv_heads = int(meta.get(f"{a}.attention.head_count_kv", heads))
    # Qwen3 sizes its heads apart from hidden / heads
    head_dim = int(meta.get(f"{a}.attention.key_length", hidden // heads)) if a == "qwen3moe" else hidden // heads
    if int(meta.get(f"{a}.rope.dimension_count", head_dim)) != head_dim or int(meta.get(f"{a}.attention.key_length", head_dim)) != head_dim:
        raise UserError(f"{str(path)!r} rotates or sizes only part of each attention head; this model needs "
                        f"head size = hidden / heads with RoPE on all of it.")
    tokenizer_json, special = _tokenizer(meta, path)  # before the slow part: it may refuse the file

    tensors, names = {}, {t.name for t in reader.tensors}
    for t in reader.tensors:
        ours = _our_name(t.name)
        if ours is None:
            raise UserError(f"{str(path)!r} has a tensor {t.name!r} that a Llama model has no place for; it cannot be imported.")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError) as err:
            kind = getattr(t.tensor_type, "name", t.tensor_type)
            raise UserError(f"{str(path)!r} stores {t.name} as {kind}, a quantization the gguf package cannot "
                            f"dequantize ({err}); use a file with another quantization.") from None
        if a == "llama" and t.name.endswith("attn_q.weight"):  # qwen3moe's converter does not permute
            w = _unpermute(w, heads)
        elif a == "llama" and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, kv_heads)
        elif "_exps." in t.name:
            w = w.swapaxes(1, 2)
        tensors[ours] = torch.from_numpy(np.array(w, order="C"))  # a writable copy, off the memory map

    moe = _moe_fields(meta, a, tensors, path)
    vocab = meta.get(f"{a}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())) or tensors["tok_embeddings.weight"].shape[0]
    cfg = ModelConfig(
        layers=int(meta[f"{a}.block_count"]), hidden=hidden, heads=heads, kv_heads=kv_heads,
        ffn_hidden=int(meta.get(f"{a}.feed_forward_length") or meta[f"{a}.expert_feed_forward_length"]),
        vocab_size=int(vocab), max_seq_len=int(meta.get(f"{a}.context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        norm_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)), **moe,
    ).validate()
    if cfg.is_moe:
        from supercluster.serve.importers.hf_moe import router_bias

        tensors.update(router_bias(cfg))
    return ImportedModel(cfg, tensors, tokenizer_json, meta.get("tokenizer.chat_template"),
                         name=str(meta.get("general.name", Path(path).stem)), **special)


def _moe_fields(meta: dict, a: str, tensors: dict, path: Path) -> dict:
    """ModelConfig's MoE fields from the expert-count keys and the stacked tensors, checked against each other."""
    experts = int(meta.get(f"{a}.expert_count", 0) or 0)
    routed = sorted(int(name.split(".")[1]) for name in tensors if name.endswith("router.gate.weight"))
    if not experts:
        if routed:
            raise UserError(f"{str(path)!r} has expert tensors but no {a}.expert_count key; the file is inconsistent.")
        return {"qk_norm": True, "head_dim": None} if a == "qwen3moe" else {}
    layers = int(meta[f"{a}.block_count"])
    dense = layers - len(routed)
    if routed != list(range(dense, layers)):
        raise UserError(f"{str(path)!r} has experts in layers {routed}; this model keeps dense only its first layers.")
    for name, t in tensors.items():
        if ("experts." in name or "router.gate" in name) and t.shape[0] != experts:
            raise UserError(f"{str(path)!r} has {t.shape[0]} experts in {name} but {a}.expert_count says {experts}; "
                            f"the file is inconsistent.")
    fields = dict(moe_experts=experts, moe_top_k=int(meta.get(f"{a}.expert_used_count", 0) or 0), moe_dense_layers=dense,
                  moe_norm_topk=bool(meta.get(f"{a}.expert_weights_norm", a != "olmoe")),
                  moe_hidden=int(meta.get(f"{a}.expert_feed_forward_length") or meta[f"{a}.feed_forward_length"]))
    if a == "qwen3moe":
        fields.update(qk_norm=True, head_dim=int(meta.get(f"{a}.attention.key_length", 0)) or None)
    elif a == "olmoe":
        fields.update(qk_norm=True, qk_norm_per_head=False)
    return fields


def _our_name(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        if parts[2].endswith("_exps"):  # stacked experts are parameters of their own, not a Linear's weight
            return f"layers.{parts[1]}.{_BLOCK[parts[2]]}" if parts[3] == "weight" else None
        return f"layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return None


def _tokenizer(meta: dict, path: Path) -> tuple[str, dict]:
    """Byte-level BPE from the GGUF vocabulary and merges, with its special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{str(path)!r} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') GGUF tokenizers can be "
                        f"rebuilt, import the model's Hugging Face folder instead.")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE({tok: i for i, tok in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    # llama.cpp's token types: 3 control (special, never split), 4 user-defined (whole, not special).
    types = list(meta.get("tokenizer.ggml.token_type", []))
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, types) if ty == 3])
    tokenizer.add_tokens([AddedToken(tok, special=False, normalized=False) for tok, ty in zip(tokens, types) if ty == 4])

    def token_id(key):
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, pad = token_id("bos_token_id"), token_id("padding_token_id")
    eos = [i for i in dict.fromkeys(token_id(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")) if i is not None]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:  # as Hugging Face does: the tokenizer itself puts BOS in front of every encoded text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer.to_str(pretty=True), {"bos": bos, "eos": eos, "pad": pad}
