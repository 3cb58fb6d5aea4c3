"""Writes that must never be seen half done.

Every node of a multi-node job prepares the same run directory at the same moment (one
`config.toml`, `tokenizer.json`, `data.json` each), so a fixed temporary name would be shared
between writers: one renames it away under the other. A temporary file of its own per writer,
in the target's folder (a rename is atomic only within one file system), then `os.replace`,
leaves a reader with the old file or a whole new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a run's files from its other users
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(err, path)


def _naming(err: BaseException, path: Path) -> BaseException:
    """`err`, or for an OSError that names no file (a write to a full disk), one naming `path`."""
    if isinstance(err, OSError) and err.filename is None and err.errno is not None:
        return OSError(err.errno, err.strerror, str(path))
    return err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` for a writer that wants a file name (safetensors' save_file):
    what the block writes there becomes `path` in one rename when it ends, and is removed when
    it raises (a full disk leaves no half-written file behind, under either name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_path(Path(tmp))
        os.chmod(tmp, 0o644)  # as write_atomic: readable by the run's other users
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(err, path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Every file and folder under root (root included) on disk: files first, then the
    folders that name them, so that a rename of root never publishes data still in cache."""
    root = Path(root)
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def commit_directory(tmp: str | os.PathLike, final: str | os.PathLike, replace: bool = False) -> bool:
    """Publish the finished folder `tmp` as `final` in one rename; True if it was published.

    A reader (or a process restarted after a crash at any instant) sees the old `final` or the
    whole new one, never a part: tmp is fsynced before the rename and the parent folder after
    it, so the rename cannot reach the disk ahead of the data it names. An existing `final` is
    kept and `tmp` discarded (False), unless `replace`: then the old folder is renamed aside,
    never deleted before the new one is in place, and removed only once the new one is durable.
    `tmp` must sit beside `final` (a rename is atomic only within one file system).
    """
    import shutil

    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    aside = None
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        aside = final.with_name(f".{final.name}.replaced-{os.getpid()}")
        os.rename(final, aside)
    try:
        os.rename(tmp, final)  # the commit point (fails rather than merge into a folder that appeared meanwhile)
    except OSError:
        if aside is not None:  # the old folder goes back; the new one was not published
            if not final.exists():
                os.rename(aside, final)
            raise
        if final.is_dir():  # another writer published it first: theirs stands
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    _fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return True
