"""Token shards: flat uint16 files (nanoGPT's layout), written once, read as memmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from supercluster.errors import UserError

DTYPE = np.uint16
PIECE_CHARS = 1_000_000  # big documents are encoded in pieces so that all cores help and memory stays bounded
BATCH_CHARS = 8_000_000  # text handed to one encode_batch call


def _pieces(doc: str) -> list[str]:
    """Cut a document at line ends into pieces of about PIECE_CHARS; their concatenation is `doc`."""
    pieces, start = [], 0
    while len(doc) - start > PIECE_CHARS:
        cut = doc.find("\n", start + PIECE_CHARS) + 1 or len(doc)
        pieces.append(doc[start:cut])
        start = cut
    pieces.append(doc[start:])
    return pieces


def encode_documents(tokenizer: Tokenizer, documents: list[str], eot_id: int) -> Iterator[np.ndarray]:
    """The token stream of the documents, each followed by `eot_id`, in uint16 chunks."""
    batch: list[str] = []
    ends: list[bool] = []  # whether the piece at the same index ends its document
    chars = 0

    def flush():
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        ids = []
        for enc, last in zip(encodings, ends):
            ids.extend(enc.ids)
            if last:
                ids.append(eot_id)
        return np.asarray(ids, dtype=DTYPE)

    for doc in documents:
        pieces = _pieces(doc)
        for i, piece in enumerate(pieces):
            batch.append(piece)
            ends.append(i == len(pieces) - 1)
            chars += len(piece)
            if chars >= BATCH_CHARS:
                yield flush()
                batch, ends, chars = [], [], 0
    if batch:
        yield flush()


def write_tokens(path: Path, chunks: Iterable[np.ndarray]) -> int:
    """Write uint16 chunks to `path`; returns the count. Written into a folder that is then
    committed whole (`files.commit_directory`), so the file itself needs no rename of its own."""
    count = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=DTYPE).tobytes())
            count += len(chunk)
    return count


def open_tokens(path: Path) -> np.ndarray:
    """A read-only uint16 memmap of a token file."""
    size = path.stat().st_size
    if size % np.dtype(DTYPE).itemsize:
        raise UserError(f"{str(path)!r} is not a flat uint16 token file (odd size {size} bytes); give a .bin written as uint16.")
    if size == 0:
        raise UserError(f"Token file {str(path)!r} is empty; give a non-empty corpus.")
    return np.memmap(path, dtype=DTYPE, mode="r")


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """Largest id (-1 when empty), read in chunks so that a file of billions of tokens never sits in memory at once."""
    return max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1)
