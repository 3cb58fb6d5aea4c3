"""`data prepare`: input files -> worker processes that parse and tokenize -> a prepared folder.

The main process reads the inputs as a stream of ~1 MB chunks (`inputs.read_chunks`) and
hands them to `workers` processes over a bounded queue; at most `2 * workers + 2` chunks are
in flight, and results are written in input order as they come back, so memory stays a few
megabytes per worker whatever the corpus size and the output is the same for any worker
count. Workers parse JSON lines themselves, so that parsing is parallel too, and report bad
rows (malformed JSON, a missing or non-text field, a malformed conversation) with their file
and line: without `skip_bad` the first one stops the prepare with that sentence and nothing
is published; with it they are counted by reason in meta.json. Workers are spawned with
jemalloc preloaded where it is installed (`jemalloc_path`) and die with the parent.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from supercluster.data.inputs import Chunk, InputFile, expand, read_chunks
from supercluster.data.prepared import PreparedWriter, check_out, file_sha256, tokenizer_digest
from supercluster.errors import UserError

FORMATS = ("text", "chat")


@dataclass
class TokenizerSource:
    """The tokenizer to encode with, and what chat rendering needs from the model it came from."""

    tokenizer: object  # tokenizers.Tokenizer
    path: Path | None  # its tokenizer.json, when it was given
    separator: int | None  # appended after every text document
    chat_template: str | None = None
    bos: str = ""
    eos: str = ""


@dataclass
class Recipe:
    """What a worker needs to turn a chunk into ids; plain data, so that it pickles to a spawned process."""

    tokenizer_json: str
    fmt: str
    field: str
    separator: int | None
    chat_template: str | None
    bos: str
    eos: str
    id_dtype: str


@dataclass
class Encoded:
    ids: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray | None
    bad: list = field(default_factory=list)  # [(file, line, reason key, sentence)]
    n_bytes: int = 0


BAD_REASONS = ("malformed_json", "missing_field", "not_text", "bad_messages")


class Encoder:
    """Runs in a worker: chunk -> Encoded."""

    def __init__(self, recipe: Recipe):
        from tokenizers import Tokenizer

        self.recipe = recipe
        self.tokenizer = Tokenizer.from_str(recipe.tokenizer_json)
        self.dtype = np.dtype(recipe.id_dtype)
        self.chat = None
        if recipe.fmt == "chat":
            from supercluster.data.chat import ChatRenderer

            self.chat = ChatRenderer(self.tokenizer, recipe.chat_template, recipe.bos, recipe.eos)

    def _rows(self, chunk: Chunk, bad: list):
        """(line, value, the row's `tools` or None) of each good row; bad ones go to `bad`. Tools
        (what a chat row's conversation may call) are read from JSON lines rows."""
        name = self.recipe.field
        if chunk.values is not None:
            if chunk.kind == "text" and self.chat is not None:
                raise UserError(f"{chunk.file} is a text file; --format chat reads JSON lines, Parquet or a saved "
                                f"dataset whose rows hold {name!r}.")
            for i, value in enumerate(chunk.values):
                yield chunk.first_row + i, value, None
            return
        for line_no, line in chunk.json_lines():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as err:  # RecursionError: nested beyond Python's parser
                bad.append((chunk.file, line_no, "malformed_json", f"is not valid JSON ({err})"))
                continue
            if not isinstance(row, dict) or name not in row or row[name] is None:
                bad.append((chunk.file, line_no, "missing_field", f"has no {name!r} field"))
                continue
            yield line_no, row[name], row.get("tools")

    def encode(self, chunk: Chunk) -> Encoded:
        bad: list = []
        if self.chat is not None:
            return self._encode_chat(chunk, bad)
        texts = []
        for line_no, value, _ in self._rows(chunk, bad):
            if not isinstance(value, str):
                bad.append((chunk.file, line_no, "not_text", f"has a {type(value).__name__} in {self.recipe.field!r}, not text"))
                continue
            texts.append(value)
        return self._encode_texts(texts, bad, chunk.n_bytes)

    def _encode_texts(self, texts: list[str], bad: list, n_bytes: int) -> Encoded:
        from supercluster.data.shards import _pieces

        pieces, owner = [], []  # a big document is cut at line ends so that no single call holds it all
        for i, text in enumerate(texts):
            for piece in _pieces(text):
                pieces.append(piece)
                owner.append(i)
        encodings = self.tokenizer.encode_batch_fast(pieces, add_special_tokens=False) if pieces else []
        sep = self.recipe.separator
        lengths = np.zeros(len(texts), dtype=np.int64)
        parts = []
        for j, (i, enc) in enumerate(zip(owner, encodings)):
            ids = enc.ids
            lengths[i] += len(ids)
            parts.append(ids)
            if sep is not None and (j + 1 == len(owner) or owner[j + 1] != i):  # the separator closes each document
                parts.append((sep,))
        if sep is not None:
            lengths += 1
        flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=self.dtype, count=int(lengths.sum()))
        return Encoded(flat, lengths, None, bad, n_bytes)

    def _encode_chat(self, chunk: Chunk, bad: list) -> Encoded:
        from supercluster.data.chat import check_messages, check_tools

        all_ids, all_masks, lengths = [], [], []
        for line_no, value, tools in self._rows(chunk, bad):
            try:
                messages = check_messages(value, f"{chunk.file}, line {line_no}")
                tools = check_tools(tools, f"{chunk.file}, line {line_no}")
            except UserError as err:
                bad.append((chunk.file, line_no, "bad_messages", str(err).split(": ", 1)[-1].rstrip(".")))
                continue
            try:
                ids, mask = self.chat.render_chat(messages, tools=tools)
            except UserError as err:  # the template refused this conversation (its raise_exception)
                bad.append((chunk.file, line_no, "bad_messages", str(err).rstrip(".")))
                continue
            all_ids.append(ids)
            all_masks.append(mask)
            lengths.append(len(ids))
        ids = np.concatenate(all_ids).astype(self.dtype) if all_ids else np.zeros(0, self.dtype)
        mask = np.concatenate(all_masks).astype(np.uint8) if all_masks else np.zeros(0, np.uint8)
        return Encoded(ids, np.asarray(lengths, dtype=np.int64), mask, bad, chunk.n_bytes)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the parent dies (Linux's PR_SET_PDEATHSIG). A parent killed
    while it writes a task leaves the worker blocked on half a message, which no timeout here would
    end; elsewhere the check of the parent's pid between tasks is all there is."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:  # it died before the request
        os._exit(0)


def _worker_main(recipe: Recipe, tasks, results, parent: int) -> None:
    _die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the processes are the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent alone stops and cleans up
    try:
        encoder = Encoder(recipe)
    except Exception as err:  # noqa: BLE001  (reported to the parent, which raises it)
        results.put((-1, "crash", repr(err)))
        return
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent died (killed): leave rather than wait forever
                return
            continue
        if task is None:
            return
        seq, chunk = task
        try:
            results.put((seq, "ok", encoder.encode(chunk)))
        except UserError as err:
            results.put((seq, "user", str(err)))
        except Exception as err:  # noqa: BLE001
            results.put((seq, "crash", f"{type(err).__name__}: {err}"))


# Where Debian/Ubuntu (libjemalloc2, which the redis package pulls in) and Fedora put jemalloc.
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def jemalloc_path() -> str | None:
    """The jemalloc to preload into tokenizer workers, or None: the normal allocator.

    Under glibc's malloc the tokenizers' Rust code (many short-lived vectors per word) makes a
    worker about twice as slow on this project's machine (bench/data_prepare.py --allocators
    default jemalloc). SUPERCLUSTER_JEMALLOC=0 turns it off, =PATH names another library; a
    missing one falls back silently."""
    choice = os.environ.get("SUPERCLUSTER_JEMALLOC", "")
    if choice == "0":
        return None
    return next((path for path in ((choice,) if choice else JEMALLOC_PATHS) if os.path.isfile(path)), None)


@contextlib.contextmanager
def _preloading(library: str | None):
    """LD_PRELOAD set to `library` for the processes spawned inside (a spawned worker is a fresh exec
    that reads it; this process's own allocator cannot change), the environment restored after."""
    if library is None:
        yield
        return
    before = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = f"{library}:{before}" if before else library
    try:
        yield
    finally:
        if before is None:
            del os.environ["LD_PRELOAD"]
        else:
            os.environ["LD_PRELOAD"] = before


class WorkerPool:
    """`workers` processes; `map_ordered(chunks)` yields their results in input order, with
    at most `2 * workers + 2` chunks read ahead."""

    def __init__(self, workers: int, recipe: Recipe):
        ctx = mp.get_context("spawn")  # no inherited threads or locks (rich's refresh thread, tokenizers' pool)
        self.tasks = ctx.Queue(maxsize=2 * workers)
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, args=(recipe, self.tasks, self.results, os.getpid()), daemon=True)
                      for _ in range(workers)]
        with _preloading(jemalloc_path()):  # start() execs the interpreter before it returns
            for p in self.procs:
                p.start()
        self.ahead = 2 * workers + 2

    def _check_workers(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"a tokenizer worker died (exit code {dead[0].exitcode}), out of memory perhaps")

    def _get(self):
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                self._check_workers()

    def _put(self, task) -> None:
        while True:  # never wait forever on a full queue that no worker reads any more
            try:
                return self.tasks.put(task, timeout=1.0)
            except queue.Full:
                self._check_workers()

    def map_ordered(self, chunks):
        pending: dict[int, object] = {}
        submitted = done = 0
        chunks = iter(chunks)
        exhausted = False
        while True:
            while not exhausted and submitted - done < self.ahead:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                self._put((submitted, chunk))
                submitted += 1
            if exhausted and done == submitted:
                return
            while done not in pending:
                seq, status, value = self._get()
                if status == "crash":
                    raise RuntimeError(f"a tokenizer worker failed: {value}")
                if status == "user":
                    raise UserError(value)
                pending[seq] = value
            yield pending.pop(done)
            done += 1

    def close(self) -> None:
        for _ in self.procs:
            try:
                self.tasks.put_nowait(None)
            except queue.Full:
                break
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
                p.join()


def resolve_tokenizer(given: str | os.PathLike | None, files: list[InputFile], field_name: str, fmt: str,
                      vocab_size: int) -> TokenizerSource:
    """The tokenizer named by --tokenizer (a run directory or a tokenizer.json), or one trained on the inputs."""
    from supercluster.data.prepare import separator_id
    from supercluster.data.tokenizer import load_tokenizer, train_tokenizer

    if given is None:
        if fmt == "chat":
            raise UserError("--format chat needs --tokenizer: a model's run directory (with its chat template) or a tokenizer.json.")
        tokenizer = train_tokenizer(_training_texts(files, field_name), vocab_size)
        return TokenizerSource(tokenizer, None, separator_id(tokenizer, None))
    path = Path(given).expanduser()
    run_dir = path if path.is_dir() else None
    tok_path = path / "tokenizer.json" if run_dir is not None else path
    if run_dir is not None and not tok_path.is_file():
        raise UserError(f"The run directory {str(path)!r} has no tokenizer.json; import a model into it or give a tokenizer.json.")
    tokenizer = load_tokenizer(tok_path)
    source = TokenizerSource(tokenizer, tok_path, None)
    if fmt == "text":
        source.separator = separator_id(tokenizer, tok_path)
    if run_dir is not None:
        from supercluster.data.chat import TEMPLATE_FILE, chat_tokens

        template = run_dir / TEMPLATE_FILE
        source.chat_template = template.read_text(encoding="utf-8") if template.is_file() else None
        source.bos, source.eos = chat_tokens(run_dir, tokenizer)  # as sample, serve and eval render it
    return source


def _training_texts(files: list[InputFile], field_name: str) -> list[str]:
    """The head of the inputs' text (bad rows skipped here; the real pass reports them)."""
    from supercluster.data.tokenizer import TRAIN_MAX_CHARS

    texts, chars = [], 0
    for chunk in read_chunks(files, field_name):
        if chunk.values is not None:
            values = chunk.values
        else:
            values = []
            for _, line in chunk.json_lines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    values.append(row.get(field_name))
        for value in values:
            if isinstance(value, str):
                texts.append(value)
                chars += len(value)
        if chars >= TRAIN_MAX_CHARS:
            break
    if not texts:
        raise UserError(f"The inputs hold no text in {field_name!r} to train a tokenizer on; check --field.")
    return texts


def _bad_sentence(bad) -> str:
    file, line, _reason, what = bad
    return f"{file}, line {line} {what}; fix or remove that row, or pass --skip-bad to skip such rows."


def prepare(inputs: list[str | os.PathLike], out: str | os.PathLike, *, field_name: str | None = None, fmt: str = "text",
            tokenizer: str | os.PathLike | None = None, vocab_size: int = 4096, workers: int = 1, skip_bad: bool = False,
            overwrite: bool = False, show_progress: bool = False) -> dict:
    """Prepare `inputs` into the folder `out`; returns its meta.json."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}.")
    field_name = field_name or ("messages" if fmt == "chat" else "text")
    check_out(out, overwrite)  # before any tokenizer is trained for it
    files = expand(inputs)
    source = resolve_tokenizer(tokenizer, files, field_name, fmt, vocab_size)
    vocab = source.tokenizer.get_vocab_size(with_added_tokens=True)
    digest = tokenizer_digest(source.tokenizer)
    writer = PreparedWriter(out, vocab, digest, loss_mask=fmt == "chat", overwrite=overwrite)
    recipe = Recipe(source.tokenizer.to_str(), fmt, field_name, source.separator, source.chat_template, source.bos,
                    source.eos, writer.dtype.name)
    skipped = {reason: 0 for reason in BAD_REASONS}
    started = time.perf_counter()
    encoder = Encoder(recipe)  # here first: a template or tokenizer that cannot load is one sentence, before any worker
    with writer:
        pool = WorkerPool(workers, recipe) if workers > 1 else None
        try:
            results = pool.map_ordered(read_chunks(files, field_name)) if pool else map(encoder.encode, read_chunks(files, field_name))
            with _progress(show_progress, files) as advance:
                for result in results:
                    if result.bad and not skip_bad:
                        raise UserError(_bad_sentence(result.bad[0]))
                    for bad in result.bad:
                        skipped[bad[2]] += 1
                    writer.add_batch(result.ids, result.lengths, result.mask)
                    advance(result.n_bytes, writer.n_tokens, time.perf_counter() - started)
        finally:
            if pool is not None:
                pool.close()
        if writer.n_documents == 0:
            raise UserError(f"The inputs hold no {'conversations' if fmt == 'chat' else 'text'} in {field_name!r}; nothing to prepare.")
        seconds = time.perf_counter() - started
        meta_inputs = [{"name": f.name, "size": f.size, "sha256": f.sha256 or file_sha256(f.path)} for f in files]
        writer.finish(tokenizer=source.tokenizer if source.path is None else source.path, inputs=meta_inputs,
                      skipped_bad={k: v for k, v in skipped.items() if v}, field=field_name, data_format=fmt,
                      separator=source.separator, seconds=round(seconds, 3))
    return json.loads((Path(writer.out) / "meta.json").read_text())


class _progress:
    """A rich bar over the input bytes with tokens/s, or nothing."""

    def __init__(self, enabled: bool, files: list[InputFile]):
        self.enabled = enabled
        compressed = any(f.path.name.lower().endswith((".gz", ".zst")) or f.kind in ("parquet", "arrow") for f in files)
        self.total = None if compressed else sum(f.size for f in files)  # bytes read are not comparable to file sizes

    def __enter__(self):
        if not self.enabled:
            return lambda *a: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("preparing"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[tps]}"),
                            TimeElapsedColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task("prepare", total=self.total, tps="")

        def advance(n_bytes: int, tokens: int, seconds: float) -> None:
            self.bar.update(self.task, advance=n_bytes, tps=f"{tokens:,} tokens, {tokens / max(seconds, 1e-9):,.0f} tokens/s")

        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
