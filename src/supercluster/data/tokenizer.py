"""A byte-level BPE tokenizer trained with Hugging Face `tokenizers` (Rust).

Byte-level means every string, in any script and with any whitespace, encodes to ids and
decodes back to exactly the same string: the 256 byte values are all in the vocabulary,
so nothing is ever unknown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from supercluster.errors import UserError
from supercluster.files import write_atomic

EOT = "<|endoftext|>"  # separates documents in the token stream; id 0
SPECIAL_TOKENS = "special_tokens.json"  # an imported model's {"bos": id|null, "eos": [ids], "pad": id|null}
MIN_VOCAB = 256 + 1  # every byte, plus EOT
MAX_VOCAB = 65535  # ids are stored as uint16

# Training looks at most at this much text: merges learned on tens of MB are as good as on
# gigabytes for our vocabulary sizes, and training time stays bounded.
TRAIN_MAX_CHARS = 32_000_000


def check_vocab_size(vocab_size: int, *, train: bool) -> None:
    if vocab_size > MAX_VOCAB:
        raise UserError(f"model.vocab_size {vocab_size} does not fit uint16 token shards; use at most {MAX_VOCAB}.")
    minimum = MIN_VOCAB if train else 1
    if vocab_size < minimum:
        raise UserError(f"model.vocab_size {vocab_size} is too small; a byte-level tokenizer needs at least {minimum}.")


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """Learn up to `vocab_size` tokens (EOT, the 256 bytes, then merges) from the documents."""
    check_vocab_size(vocab_size, train=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 split, no added space
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tokenizer.train_from_iterator(_head(documents, TRAIN_MAX_CHARS), trainer)
    return tokenizer


def _head(documents: list[str], max_chars: int):
    left = max_chars
    for doc in documents:
        if left <= 0:
            return
        yield doc[:left]
        left -= len(doc)


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    write_atomic(path, tokenizer.to_str(pretty=True))


def load_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
    """The tokenizer saved with a dataset (`DataBundle.tokenizer_path`)."""
    if path is None:
        raise UserError("This data has no tokenizer; put a tokenizer.json next to the .bin file to encode or decode text.")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Tokenizer file {str(path)!r} does not exist; prepare the data again to recreate it.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise UserError(f"Tokenizer file {str(path)!r} is not a valid tokenizers JSON file ({e}); delete it and prepare the data again.") from None


def load_special_tokens(path: str | os.PathLike, vocab_size: int) -> dict:
    """An imported model's special token ids ({} when the file is absent), checked whole: a
    wrong end-of-sequence id would end every generation early, or never."""
    path = Path(path)
    if not path.is_file():
        return {}
    fix = "import the model again to rewrite it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err}); {fix}.") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(path)!r} must hold an object like {{\"bos\": 1, \"eos\": [2], \"pad\": null}}; {fix}.")
    eos = data.get("eos") or []
    ids = {"bos": [data.get("bos")], "pad": [data.get("pad")], "eos": eos if isinstance(eos, list) else [eos]}
    for key, values in ids.items():
        for value in values:
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size):
                raise UserError(f"{str(path)!r}: {key} id {value!r} is not a token id of the vocabulary of {vocab_size}; {fix}.")
    return {"bos": data.get("bos"), "eos": [i for i in ids["eos"] if i is not None], "pad": data.get("pad")}
