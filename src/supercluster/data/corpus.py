"""Corpora: which text files to read, in which order, and how much of them.

A corpus is an ordered list of documents (one per file). The order is fixed (sorted
paths) so that the same folder always gives the same tokens, the same cache key and the
same batches on every rank and every machine.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from supercluster.errors import UserError

# Folders of the standard library left out of the default corpus: third-party packages,
# the (very large) test suites, and `encodings`, which is mostly generated codec tables.
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}


@dataclass
class Corpus:
    documents: list[str]
    source: str  # a short human description, e.g. "Python 3.11 standard library (8.0 MB, 610 files)"

    @property
    def n_bytes(self) -> int:
        return sum(len(doc.encode("utf-8")) for doc in self.documents)

    def digest(self) -> str:
        """sha256 of the documents in order; a length prefix keeps document boundaries in the hash."""
        h = hashlib.sha256()
        for doc in self.documents:
            data = doc.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running interpreter's own *.py sources, sorted, without tests and site-packages."""
    files = []
    for folder, subfolders, names in os.walk(stdlib_root()):
        subfolders[:] = sorted(d for d in subfolders if d not in STDLIB_SKIP)  # prune and fix walk order
        files.extend(Path(folder) / name for name in sorted(names) if name.endswith(".py"))
    return files


def text_files(folder: Path) -> list[Path]:
    """Every non-hidden file under `folder`, sorted; binary files are dropped later on reading."""
    files = []
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        files.extend(Path(parent) / name for name in sorted(names) if not name.startswith("."))
    return files


def _decode(data: bytes, truncated: bool) -> str | None:
    """UTF-8 text, or None for binary data (a NUL byte or invalid UTF-8).

    When the bytes were cut at the size cap, an incomplete last character is dropped
    rather than taken for binary.
    """
    if b"\0" in data:
        return None
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
    except UnicodeDecodeError:
        return None


def read_documents(files: list[Path], max_bytes: int | None) -> tuple[list[str], int]:
    """Read text files in order until `max_bytes`; returns the documents and how many files were read.

    The file that crosses the cap is cut, so the corpus is exactly as large as asked even
    when it is one big file.
    """
    documents, total = [], 0
    for path in files:
        budget = None if max_bytes is None else max_bytes - total
        if budget is not None and budget <= 0:
            break
        with open(path, "rb") as f:
            data = f.read() if budget is None else f.read(budget + 1)
        truncated = budget is not None and len(data) > budget
        text = _decode(data[:budget] if truncated else data, truncated)
        if text:
            documents.append(text)
            total += len(text.encode("utf-8"))
    return documents, total


def load_corpus(path: str | os.PathLike | None, max_mb: float | None) -> Corpus:
    """The stdlib corpus (path None), one text file, or a folder of text files."""
    max_bytes = None if max_mb is None else int(max_mb * 1e6)
    if max_bytes is not None and max_bytes <= 0:
        raise UserError(f"max_mb must be positive, got {max_mb}.")
    if path is None:
        files = stdlib_files()
        documents, total = read_documents(files, max_bytes)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        source = f"Python {version} standard library ({total / 1e6:.1f} MB, {len(documents)} files)"
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise UserError(f"Corpus path {str(path)!r} does not exist; set data.path to a text file, a folder or a .bin file.")
        if path.is_dir():
            documents, total = read_documents(text_files(path), max_bytes)
            source = f"text folder {path} ({total / 1e6:.1f} MB, {len(documents)} files)"
        else:
            documents, total = read_documents([path], max_bytes)
            if not documents and path.stat().st_size:
                raise UserError(f"Corpus file {str(path)!r} is not UTF-8 text; give a text file or a pre-tokenized .bin file.")
            source = f"text file {path} ({total / 1e6:.1f} MB)"
    if not documents:
        raise UserError(f"The corpus at {str(path or stdlib_root())!r} holds no text; point data.path at text files.")
    return Corpus(documents, source)
