"""Llama-architecture GGUF files (llama.cpp's format), dequantized to fp32 with `gguf`.

Two things differ from this project's layout besides the names:
- llama.cpp's converter permutes the rows of q and k inside each head so that RoPE rotates
  adjacent pairs (x0, x1), (x2, x3)...; our RoPE rotates the two halves of a head, as
  Hugging Face Llama does, so the permutation is undone here.
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
}
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
    if arch != "llama":
        raise UserError(f"{str(path)!r} holds a {arch!r} model; only the llama architecture can be imported.")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UserError(f"{str(path)!r} uses RoPE scaling, which this model does not implement; import a model without it.")
    for key in ("llama.attention.head_count", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length"):
        if key not in meta:
            raise UserError(f"{str(path)!r} lacks the metadata key {key}, which every llama GGUF has; the file is incomplete.")
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = hidden // heads
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim or int(meta.get("llama.attention.key_length", head_dim)) != head_dim:
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
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, kv_heads)
        tensors[ours] = torch.from_numpy(np.array(w, order="C"))  # a writable copy, off the memory map

    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())) or tensors["tok_embeddings.weight"].shape[0]
    cfg = ModelConfig(
        layers=int(meta["llama.block_count"]), hidden=hidden, heads=heads, kv_heads=kv_heads,
        ffn_hidden=int(meta["llama.feed_forward_length"]), vocab_size=int(vocab),
        max_seq_len=int(meta.get("llama.context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
    ).validate()
    return ImportedModel(cfg, tensors, tokenizer_json, meta.get("tokenizer.chat_template"),
                         name=str(meta.get("general.name", Path(path).stem)), **special)


def _our_name(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
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
