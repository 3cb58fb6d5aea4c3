"""The prepared-dataset folder: token ids on disk, a document index, and meta.json last.

    DIR/tokens.bin      every document's ids, back to back (uint16 when the vocabulary fits, else uint32)
    DIR/docs.idx        int64, documents + 1 token offsets: document i is tokens[idx[i]:idx[i+1]]
    DIR/loss_mask.bin   optional, uint8 per token: 1 where the token is a trained target (chat/SFT data)
    DIR/tokenizer.json  the tokenizer the ids came from (its digest is in meta.json)
    DIR/meta.json       format, dtype, vocab_size, tokenizer digest, counts, inputs, skipped rows

The layout is Megatron-LM's `.bin`/`.idx` pair in spirit: a flat token file that a memmap
reads at any offset, and an offset per document. `PreparedWriter` builds the folder under
`DIR.tmp-<pid>` and renames it whole once meta.json, written last, is in it; a reader trusts
only a folder with meta.json, so an interrupted prepare leaves nothing a run would use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from supercluster.errors import UserError
from supercluster.files import commit_directory

FORMAT = "supercluster-prepared"
FORMAT_VERSION = 1
TOKENS, INDEX, LOSS_MASK, META, TOKENIZER = "tokens.bin", "docs.idx", "loss_mask.bin", "meta.json", "tokenizer.json"
# Ids up to 65,499 go in uint16; a little head room below 65,535 so that a tokenizer that
# grows a few added tokens later is not silently truncated.
UINT16_MAX_VOCAB = 65_500
INDEX_DTYPE = np.int64


def dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest id type for a vocabulary: uint16 when it fits, uint32 otherwise."""
    if vocab_size < 1:
        raise UserError(f"A vocabulary size must be positive, got {vocab_size}.")
    if vocab_size > 2**32:
        raise UserError(f"A vocabulary of {vocab_size} ids does not fit uint32 token files.")
    return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (a `tokenizers.Tokenizer`, or a path to its file).

    The JSON is re-serialized by `tokenizers` itself, so the same tokenizer saved pretty or
    compact, or loaded and saved again, has the same digest.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from supercluster.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return hashlib.sha256(tokenizer.to_str(pretty=False).encode("utf-8")).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` is a finished prepared-dataset folder (it has our meta.json)."""
    meta = Path(path) / META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PreparedWriter:
    """Append documents (ids, optional loss mask); `finish()` publishes the folder whole.

        with PreparedWriter(out, vocab_size, digest) as w:   # an exception inside: nothing published
            w.add(ids)                                       # one document
            w.add_batch(flat_ids, lengths)                   # many at once (the workers' fast path)
            w.finish(tokenizer=tok, inputs=[...], skipped_bad={...})
    """

    def __init__(self, out: str | os.PathLike, vocab_size: int, tokenizer_digest: str, loss_mask: bool = False,
                 overwrite: bool = False):
        self.out = Path(out).expanduser().absolute()
        if self.out.exists() and not overwrite:
            what = "a prepared dataset" if is_prepared(self.out) else "a file or folder"
            raise UserError(f"{str(self.out)!r} already exists ({what}); choose another --out or remove it first.")
        if not self.out.parent.is_dir():
            raise UserError(f"The folder {str(self.out.parent)!r} for {self.out.name!r} does not exist; create it first.")
        self.overwrite = overwrite
        self.vocab_size = vocab_size
        self.dtype = dtype_for(vocab_size)
        self.digest = tokenizer_digest
        self.has_loss_mask = loss_mask
        self._clear_stale()
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self._tokens = open(self.tmp / TOKENS, "wb")
        self._index = open(self.tmp / INDEX, "wb")
        self._mask = open(self.tmp / LOSS_MASK, "wb") if loss_mask else None
        self._index.write(np.zeros(1, INDEX_DTYPE).tobytes())
        self.n_tokens = 0
        self.n_documents = 0
        self.done = False

    def _clear_stale(self) -> None:
        """Remove the temporary folders of earlier prepares of the same output that died."""
        for stale in self.out.parent.glob(f"{self.out.name}.tmp-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)

    def add(self, ids, loss_mask=None) -> None:
        ids = np.asarray(ids)
        self.add_batch(ids, [len(ids)], loss_mask)

    def add_batch(self, ids, lengths, loss_mask=None) -> None:
        """Documents given as their ids back to back and each one's length."""
        ids = np.asarray(ids)
        lengths = np.asarray(lengths, dtype=INDEX_DTYPE)
        if int(lengths.sum()) != len(ids):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(ids)} ids were given")
        if (self._mask is not None) != (loss_mask is not None):
            raise ValueError("a loss mask is given for every batch of a masked dataset, and for none of an unmasked one")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise UserError(f"Token id {int(ids.max())} is outside the vocabulary of {self.vocab_size}; "
                            f"the tokenizer and the vocabulary size disagree.")
        self._tokens.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        if self._mask is not None:
            mask = np.asarray(loss_mask, dtype=np.uint8)
            if len(mask) != len(ids):
                raise ValueError(f"{len(mask)} loss-mask values for {len(ids)} ids")
            self._mask.write(mask.tobytes())
        self._index.write((self.n_tokens + np.cumsum(lengths)).astype(INDEX_DTYPE).tobytes())
        self.n_tokens += len(ids)
        self.n_documents += len(lengths)

    def finish(self, tokenizer=None, inputs: list[dict] | None = None, skipped_bad: dict | None = None,
               **extra) -> Path:
        """Close the files, write tokenizer.json and meta.json (last), and rename the folder into place."""
        for f in (self._tokens, self._index, self._mask):
            if f is not None:
                f.close()
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                shutil.copyfile(tokenizer, self.tmp / TOKENIZER)
            else:
                (self.tmp / TOKENIZER).write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
            "tokenizer_digest": self.digest, "documents": self.n_documents, "tokens": self.n_tokens,
            "loss_mask": self.has_loss_mask, "inputs": list(inputs or []),
            "skipped_bad": dict(skipped_bad or {}), **extra,
        }
        (self.tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if not commit_directory(self.tmp, self.out, replace=self.overwrite):
            raise UserError(f"{str(self.out)!r} appeared while preparing (another prepare?); this one was discarded.")
        self.done = True
        return self.out

    def abort(self) -> None:
        for f in (self._tokens, self._index, self._mask):
            if f is not None and not f.closed:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.done:
            self.abort()


class PreparedDataset:
    """A finished prepared folder, read through memmaps (nothing is loaded whole)."""

    def __init__(self, path: str | os.PathLike, tokenizer_digest: str | None = None):
        self.path = Path(path).expanduser()
        where = str(self.path)
        if not self.path.is_dir():
            raise UserError(f"The prepared dataset {where!r} does not exist; run `supercluster data prepare ... --out {where}`.")
        meta_file = self.path / META
        if not meta_file.is_file():
            raise UserError(f"{where!r} is not a finished prepared dataset (it has no {META}; an interrupted "
                            f"`supercluster data prepare` leaves none): prepare it again.")
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
            ok = isinstance(self.meta, dict) and self.meta.get("format") == FORMAT
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise UserError(f"{str(meta_file)!r} is not the meta.json of a prepared dataset; prepare {where!r} again.")
        if self.meta.get("version") != FORMAT_VERSION:
            raise UserError(f"{where!r} is in prepared-dataset format {self.meta.get('version')!r}, this version reads "
                            f"{FORMAT_VERSION}; prepare it again.")
        if tokenizer_digest is not None and tokenizer_digest != self.meta["tokenizer_digest"]:
            raise UserError(f"The prepared dataset {where!r} was tokenized with another tokenizer than this run's "
                            f"(digest {self.meta['tokenizer_digest'][:12]} vs {tokenizer_digest[:12]}); prepare it "
                            f"again with --tokenizer set to this run's.")
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.n_tokens = int(self.meta["tokens"])
        self.n_documents = int(self.meta["documents"])
        self.tokens = self._open(TOKENS, self.dtype, self.n_tokens)
        self.doc_offsets = self._open(INDEX, INDEX_DTYPE, self.n_documents + 1)
        if int(self.doc_offsets[-1]) != self.n_tokens:
            raise UserError(f"{where!r}: the document index ends at {int(self.doc_offsets[-1])}, not at the "
                            f"{self.n_tokens} tokens meta.json counts; prepare it again.")
        self._mask = self._open(LOSS_MASK, np.uint8, self.n_tokens) if self.meta.get("loss_mask") else None

    def _open(self, name: str, dtype, count: int) -> np.ndarray:
        path = self.path / name
        expected = count * np.dtype(dtype).itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            raise UserError(f"{str(path)!r} holds {max(size, 0)} bytes, not the {expected} that meta.json describes; "
                            f"prepare {str(self.path)!r} again.")
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.path / TOKENIZER
        return path if path.is_file() else None

    @property
    def digest(self) -> str:
        return self.meta["tokenizer_digest"]

    @property
    def has_loss_mask(self) -> bool:
        return self._mask is not None

    def __len__(self) -> int:
        return self.n_documents

    def _span(self, i: int) -> slice:
        if not -self.n_documents <= i < self.n_documents:
            raise IndexError(f"document {i} of {self.n_documents}")
        i %= self.n_documents
        return slice(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))

    def doc(self, i: int) -> np.ndarray:
        """Document i's ids (a view into the memmap)."""
        return self.tokens[self._span(i)]

    def loss_mask(self, i: int) -> np.ndarray | None:
        """Document i's loss mask (1: a trained target), or None for a dataset without one."""
        return None if self._mask is None else self._mask[self._span(i)]

    @property
    def loss_masks(self) -> np.ndarray | None:
        """The whole loss-mask memmap, aligned with `tokens`."""
        return self._mask
