"""A run directory's tokenizer, its end-of-sequence ids and its chat template.

The chat template (`data.chat`, shared with fine-tuning) is Jinja rendered as Hugging Face
renders it, so an imported model is prompted exactly as its authors trained it, and a model
fine-tuned here exactly as its chat data was rendered.
"""

from __future__ import annotations

from pathlib import Path

from supercluster.data.chat import EOT, PLAIN_TEMPLATE, ChatTemplate, load_chat  # noqa: F401 (serving's names)
from supercluster.errors import UserError


def load_tokenizer_and_specials(run_dir: Path):
    """(tokenizer, end-of-sequence ids) of a run directory."""
    from tokenizers import Tokenizer

    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no tokenizer.json; serving needs text, so train on text or import a model.")
    tokenizer = Tokenizer.from_file(str(path))
    specials = _specials(run_dir, tokenizer)
    eos = set(specials.get("eos") or [])
    if not eos and tokenizer.token_to_id(EOT) is not None:
        eos.add(tokenizer.token_to_id(EOT))
    return tokenizer, eos


def _specials(run_dir: Path, tokenizer) -> dict:
    from supercluster.data.tokenizer import SPECIAL_TOKENS, load_special_tokens

    return load_special_tokens(Path(run_dir) / SPECIAL_TOKENS, tokenizer.get_vocab_size())


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    other 68 are shifted past 255 so that every byte has a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def _decoder_kinds(tokenizer) -> set[str]:
    """The types in the tokenizer's decoder pipeline ("ByteLevel", "ByteFallback", "Metaspace", ...)."""
    import json

    kinds: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if "type" in node:
                kinds.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(tokenizer.to_str()).get("decoder"))
    return kinds


class TokenText:
    """Each token's own bytes and its text as OpenAI names tokens in log-probabilities (" Paris",
    not the byte-level symbol "ĠParis"); a token holding part of a character is named by its
    bytes escaped ("\\xe2\\x80"), as OpenAI does. Looked up once per id."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size or 0, tokenizer.get_vocab_size())
        kinds = _decoder_kinds(tokenizer)
        self.kind = "byte_level" if "ByteLevel" in kinds else "byte_fallback" if "ByteFallback" in kinds else "raw"
        self.special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._alphabet = _byte_level_alphabet() if self.kind == "byte_level" else {}
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._raw(token_id)
        return cached

    def _raw(self, token_id: int) -> bytes:
        if token_id in self.special:
            return self.special[token_id].encode()
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:  # a model's padding rows past the tokenizer's vocabulary
            return b""
        if self.kind == "byte_level":
            if all(c in self._alphabet for c in piece):
                return bytes(self._alphabet[c] for c in piece)
            return piece.encode()
        if self.kind == "byte_fallback":
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="backslashreplace")

    def vocabulary(self) -> list[bytes]:
        """Every id's bytes, in id order (for a constrained-decoding library's token table)."""
        return [self.bytes(i) for i in range(self.vocab_size)]


class Detokenizer:
    """A sequence's text, one token at a time (tokenizers' `DecodeStream`: it holds a character's
    first bytes back until its last arrives), instead of re-decoding the whole output each token.
    It starts from the prompt's last tokens, so a first token's leading space decodes as it
    would in context."""

    CONTEXT = 4

    def __init__(self, tokenizer, prompt: list[int]):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=list(prompt[-self.CONTEXT:]), skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer, token_id) or ""
