"""prepare_data: a corpus in, a tokenizer and train/val token memmaps out, cached.

Text corpora are tokenized once: the tokenizer and shards land in
`cache_dir/<key>/` where the key hashes the corpus content, the vocabulary size and the
split, so a second run (or a second rank) opens memmaps in well under a second. The folder
is built under a temporary name and renamed into place as a whole, so a crash never
leaves a cache that a later run would trust; a file lock makes concurrent ranks build it
once. Pre-tokenized `.bin` files are opened as they are, without a cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from supercluster.data.corpus import Corpus, load_corpus
from supercluster.data.shards import encode_documents, max_token_id, open_tokens, write_tokens
from supercluster.data.tokenizer import (
    EOT, SPECIAL_TOKENS, check_vocab_size, load_special_tokens, load_tokenizer, save_tokenizer, train_tokenizer,
)
from supercluster.errors import UserError
from supercluster.files import commit_directory
from supercluster.paths import home

# Cap on the default (standard library) corpus: ~2.3M tokens at vocab 4096, several epochs
# of the demo's budget, and about 10 s of tokenizer training plus encoding on 2 cores.
DEFAULT_STDLIB_MB = 8.0
CACHE_FORMAT = 1  # bump when the cache layout or tokenizer recipe changes


@dataclass
class DataBundle:
    train: np.ndarray  # uint16 memmap
    val: np.ndarray  # uint16 memmap
    tokenizer_path: Path | None  # None for a .bin without a tokenizer.json next to it
    vocab_size: int  # the requested size; every token id is below it
    source: str  # a short human description of the corpus
    n_tokens: int  # train + val


def default_cache_dir() -> Path:
    return home() / "data"


def prepare_data(
    path: str | os.PathLike | None,
    vocab_size: int,
    cache_dir: Path | None = None,
    val_fraction: float = 0.05,
    max_mb: float | None = None,
    tokenizer_path: Path | None = None,
) -> DataBundle:
    """Tokenized train/val splits of a corpus: the stdlib (path None), text file or folder, or .bin.

    `max_mb` caps the text read (default DEFAULT_STDLIB_MB for the stdlib, no cap otherwise);
    it does not apply to .bin files. Validation is the last `val_fraction` of the tokens
    (val is empty when it is 0). `tokenizer_path`: encode with this tokenizer (an imported
    model's) instead of training one.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}.")
    if path is not None:
        bin_path = Path(path).expanduser()
        if bin_path.is_file() and bin_path.suffix == ".bin":
            return _pretokenized(bin_path, None, vocab_size, val_fraction)
        if bin_path.is_dir() and (bin_path / "train.bin").is_file():  # nanoGPT's folder: train.bin, val.bin
            val_path = bin_path / "val.bin"
            return _pretokenized(bin_path / "train.bin", val_path if val_path.is_file() else None, vocab_size, val_fraction)
    check_vocab_size(vocab_size, train=True)
    if path is None and max_mb is None:
        max_mb = DEFAULT_STDLIB_MB
    corpus = load_corpus(path, max_mb)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    given = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest() if tokenizer_path is not None else ""
    key = hashlib.sha256(f"{CACHE_FORMAT}|{vocab_size}|{val_fraction!r}|{corpus.digest()}|{given}".encode()).hexdigest()[:24]
    folder = cache_dir / key
    if not folder.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir / f".{key}.lock"):
            if not folder.is_dir():  # another process may have built it while we waited
                _build(corpus, vocab_size, val_fraction, folder, tokenizer_path)
    train = open_tokens(folder / "train.bin")
    val = open_tokens(folder / "val.bin") if (folder / "val.bin").stat().st_size else train[len(train) :]  # empty: nothing held out
    return DataBundle(train, val, folder / "tokenizer.json", vocab_size, corpus.source, len(train) + len(val))


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, even if the process dies
        yield


def _build(corpus: Corpus, vocab_size: int, val_fraction: float, folder: Path, tokenizer_path: Path | None = None) -> None:
    """Train the tokenizer (or take the given one), encode, split, and rename the finished folder into place."""
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    for stale in folder.parent.glob(f".tmp-{folder.name}-*"):  # left by a crashed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        if tokenizer_path is None:
            tokenizer = train_tokenizer(corpus.documents, vocab_size)
            save_tokenizer(tokenizer, tmp / "tokenizer.json")
        else:  # byte for byte: the cache key hashes the file, and the run directory gets this copy back
            tokenizer = load_tokenizer(tokenizer_path)
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        n_tokens = write_tokens(tmp / "all.bin", encode_documents(tokenizer, corpus.documents, separator_id(tokenizer, tokenizer_path)))
        n_val = _val_size(n_tokens, val_fraction, corpus.source)
        tokens = open_tokens(tmp / "all.bin")
        write_tokens(tmp / "train.bin", [tokens[: n_tokens - n_val]])
        write_tokens(tmp / "val.bin", [tokens[n_tokens - n_val :]])
        del tokens
        (tmp / "all.bin").unlink()
        meta = {"n_tokens": n_tokens, "vocab_size": vocab_size, "source": corpus.source, "format": CACHE_FORMAT}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        # The commit point: the folder appears complete or not at all; one built meanwhile by a
        # process the lock did not hold back (e.g. on NFS) stands, and ours is dropped.
        commit_directory(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def separator_id(tokenizer, tokenizer_path: Path | None) -> int:
    """The id between documents: EOT, or for a given tokenizer without it the first end-of-sequence
    token its `special_tokens.json` (written next to it on import) names."""
    found = tokenizer.token_to_id(EOT)
    if found is not None:
        return found
    special = Path(tokenizer_path).with_name(SPECIAL_TOKENS) if tokenizer_path is not None else None
    eos = load_special_tokens(special, tokenizer.get_vocab_size()).get("eos") if special is not None else None
    if not eos:
        raise UserError(f"The tokenizer {str(tokenizer_path)!r} has no {EOT} token and no end-of-sequence id in a "
                        f"special_tokens.json next to it; documents cannot be separated.")
    return int(eos[0])


def _val_size(n_tokens: int, val_fraction: float, source: str) -> int:
    """Tokens held out for validation; each split must hold at least one (input, target) pair."""
    n_val = max(2, round(n_tokens * val_fraction)) if val_fraction else 0
    if n_tokens - n_val < 2:
        raise UserError(f"The corpus ({source}) gives only {n_tokens} tokens, too few to split into train and validation; use a bigger corpus.")
    return n_val


def _pretokenized(train_path: Path, val_path: Path | None, vocab_size: int, val_fraction: float) -> DataBundle:
    """A flat uint16 .bin taken as is (split by val_fraction unless a val.bin sits next to it)."""
    check_vocab_size(vocab_size, train=False)
    tokens = open_tokens(train_path)
    if val_path is None:
        n_val = _val_size(len(tokens), val_fraction, str(train_path))
        train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    else:
        train, val = tokens, open_tokens(val_path)
    for path, split in ((train_path, train), (val_path or train_path, val)):
        top = max_token_id(split)
        if top >= vocab_size:
            raise UserError(f"{str(path)!r} holds token id {top}, beyond model.vocab_size {vocab_size}; raise model.vocab_size to at least {top + 1}.")
    tokenizer_path = train_path.parent / "tokenizer.json"
    if tokenizer_path.is_file():
        size = load_tokenizer(tokenizer_path).get_vocab_size()
        if size > vocab_size:
            raise UserError(f"{str(tokenizer_path)!r} has {size} tokens, more than model.vocab_size {vocab_size}; raise model.vocab_size to at least {size}.")
    else:
        tokenizer_path = None
    return DataBundle(
        train=train,
        val=val,
        tokenizer_path=tokenizer_path,
        vocab_size=vocab_size,
        source=f"pre-tokenized {train_path} ({len(train) + len(val):,} tokens)",
        n_tokens=len(train) + len(val),
    )
