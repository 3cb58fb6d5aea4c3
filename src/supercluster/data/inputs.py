"""Input files for `data prepare`, read as a stream of bounded chunks of rows.

Kinds, picked per file by name: JSON lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`; also
`.json` lines), Parquet (`.parquet`, read one record batch at a time), Arrow IPC files as
`datasets.save_to_disk` writes them (`.arrow`), and anything else as UTF-8 text, one document
per file (binary files are skipped). A text file is streamed too: one larger than CHUNK_BYTES
is cut at line ends into documents of about CHUNK_BYTES (a boundary every ~250K tokens, far
beyond any context), so that a many-gigabyte dump never sits in memory whole. A folder is walked in sorted order; a folder
that `save_to_disk` wrote (`state.json`, or `dataset_dict.json` over split folders) is read
through its own list of arrow files, in order.

JSON lines travel to the workers as blocks of raw bytes cut at line ends (one bytes object
per ~1 MB, not a Python object per row: cheap to pickle), so that splitting, parsing and
finding bad rows are done in parallel too; the other kinds are decoded here into Python values.
Files read front to back (JSON lines, text) are hashed as they are read, so meta.json's
digests cost no second pass over the corpus.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from supercluster.errors import UserError

CHUNK_BYTES = 1 << 20  # rows handed to a worker at once: big enough to amortize, small enough to bound memory
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")


@dataclass
class Chunk:
    """Rows of one file: whole JSON lines as raw bytes (`block`), or values (`values`) already decoded."""

    file: str
    kind: str  # "jsonl" | "table" | "text"
    first_row: int  # 1-based line (JSON lines) or row number of the first row
    block: bytes | None = None
    values: list | None = None
    n_bytes: int = 0

    def json_lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, raw line) of each row of a JSON lines block; blank lines are not rows."""
        for offset, line in enumerate(self.block.split(b"\n")):
            if line.strip():
                yield self.first_row + offset, line


@dataclass
class InputFile:
    path: Path
    kind: str  # "jsonl" | "parquet" | "arrow" | "text"
    size: int = field(default=0)
    sha256: str | None = None  # set by the reader of a file read whole front to back; None: hash it apart

    @property
    def name(self) -> str:
        return str(self.path)


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES) or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "text"


def _saved_dataset_files(folder: Path) -> list[Path] | None:
    """The arrow files of a `datasets.save_to_disk` folder, in order; None for any other folder."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits") or []
        files = []
        for split in splits:
            files += _saved_dataset_files(folder / split) or []
        return files
    state = folder / "state.json"
    if state.is_file() and (folder / "dataset_info.json").is_file():
        names = [entry["filename"] for entry in json.loads(state.read_text()).get("_data_files", [])]
        return [folder / name for name in names]
    return None


def expand(inputs: list[str | os.PathLike]) -> list[InputFile]:
    """Every input file, in the order given (folders walked sorted), each with its kind."""
    files: list[InputFile] = []
    if not inputs:
        raise UserError("Give at least one input file or folder to prepare.")
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"Input {str(path)!r} does not exist.")
        if path.is_file():
            files.append(InputFile(path, kind_of(path), path.stat().st_size))
            continue
        saved = _saved_dataset_files(path)
        if saved is not None:
            files += [InputFile(p, "arrow", p.stat().st_size) for p in saved]
            continue
        for parent, subfolders, names in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith("."):
                    p = Path(parent) / name
                    files.append(InputFile(p, kind_of(p), p.stat().st_size))
    if not files:
        raise UserError(f"The inputs {', '.join(map(str, inputs))} hold no files.")
    return files


class _Digesting:
    """A file whose bytes go through sha256 as they are read (by us or by a decompressor)."""

    def __init__(self, path: Path):
        self.raw = open(path, "rb")
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data

    def hexdigest(self) -> str:
        """The whole file's digest: bytes a decompressor left unread (past a gzip member) included."""
        while self.read(CHUNK_BYTES):
            pass
        return self.sha.hexdigest()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


def _decompressed(path: Path, raw: _Digesting):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)  # zstd -c a b > c: many frames
    return contextlib.nullcontext(raw)


def _jsonl_chunks(f: InputFile) -> Iterator[Chunk]:
    """Blocks of at least CHUNK_BYTES (or the file's rest) that end at a line's end."""
    line, pending, size = 1, [], 0
    with _Digesting(f.path) as raw, _decompressed(f.path, raw) as stream:
        while block := stream.read(CHUNK_BYTES):
            pending.append(block)
            size += len(block)
            cut = block.rfind(b"\n") + 1
            if size < CHUNK_BYTES or not cut:  # a short read (decompressors), or inside a line longer than a block
                continue
            data = b"".join([*pending[:-1], block[:cut]])
            pending = [block[cut:]]
            size = len(pending[0])
            yield Chunk(f.name, "jsonl", line, block=data, n_bytes=len(data))
            line += data.count(b"\n")
        if size:  # the rest; its last line may lack a newline
            data = b"".join(pending)
            yield Chunk(f.name, "jsonl", line, block=data, n_bytes=len(data))
        f.sha256 = raw.hexdigest()


def _table_chunks(f: InputFile, batches, column: str) -> Iterator[Chunk]:
    row = 1
    for batch in batches:
        if column not in batch.schema.names:
            raise UserError(f"{f.name} has no column {column!r} (its columns: {', '.join(batch.schema.names)}); "
                            f"pick one with --field.")
        values = batch.column(column).to_pylist()
        yield Chunk(f.name, "table", row, values=values, n_bytes=int(batch.nbytes))
        row += len(values)


def _record_batches(f: InputFile, column: str):
    import pyarrow as pa

    if f.kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(f.path)
        if column not in parquet.schema_arrow.names:
            raise UserError(f"{f.name} has no column {column!r} (its columns: {', '.join(parquet.schema_arrow.names)}); "
                            f"pick one with --field.")
        yield from parquet.iter_batches(batch_size=1024, columns=[column])
        return
    with pa.memory_map(str(f.path)) as source:  # datasets writes the IPC stream format; plain arrow files too
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def read_chunks(files: list[InputFile], column: str) -> Iterator[Chunk]:
    """Every file's rows in order, in chunks of about CHUNK_BYTES."""
    for f in files:
        if f.kind == "jsonl":
            yield from _jsonl_chunks(f)
        elif f.kind in ("parquet", "arrow"):
            try:
                yield from _table_chunks(f, _record_batches(f, column), column)
            except UserError:
                raise
            except Exception as err:  # pyarrow's own errors name no file
                raise UserError(f"{f.name} is not a readable {f.kind} file ({err}).") from None
        else:
            yield from _text_chunks(f)


def _text_chunks(f: InputFile) -> Iterator[Chunk]:
    """A text file as documents of about CHUNK_BYTES each, cut after a line's end (a line longer than
    that is cut where it reaches 4 CHUNK_BYTES); a file that starts binary (images, archives in a text
    folder) is skipped, as in training corpora."""
    decoder = codecs.getincrementaldecoder("utf-8")()  # keeps a character split between two reads
    text, n_bytes, offset, yielded = "", 0, 0, False
    with _Digesting(f.path) as stream:
        while block := stream.read(CHUNK_BYTES):
            binary = b"\0" in block  # a NUL byte, or bytes that are not UTF-8
            if not binary:
                try:
                    text += decoder.decode(block)
                except UnicodeDecodeError:
                    binary = True
            if binary:
                if not yielded:
                    return
                raise UserError(f"{f.name} is UTF-8 text up to byte {offset} and binary after it; remove it from the "
                                f"inputs or fix it.") from None
            offset += len(block)
            n_bytes += len(block)
            if n_bytes < CHUNK_BYTES:  # read since the last document: the file's last block, or a short read
                continue
            cut = text.rfind("\n") + 1 or (len(text) if len(text) >= 4 * CHUNK_BYTES else 0)
            if cut:
                yield Chunk(f.name, "text", 1, values=[text[:cut]], n_bytes=n_bytes)
                text, n_bytes, yielded = text[cut:], 0, True
        f.sha256 = stream.hexdigest()
    try:
        text += decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # the file ends inside a character
        if not yielded:
            return
        raise UserError(f"{f.name} ends in the middle of a UTF-8 character; fix or remove it.") from None
    if text:
        yield Chunk(f.name, "text", 1, values=[text], n_bytes=n_bytes)
