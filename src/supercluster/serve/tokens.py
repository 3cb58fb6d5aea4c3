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
