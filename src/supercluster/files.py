"""Writes that must never be seen half done.

Every node of a multi-node job prepares the same run directory at the same moment (one
`config.toml`, `tokenizer.json`, `data.json` each), so a fixed temporary name would be shared
between writers: one renames it away under the other. A temporary file of its own per writer,
in the target's folder (a rename is atomic only within one file system), then `os.replace`,
leaves a reader with the old file or a whole new one.
"""

from __future__ import annotations

import os
import tempfile
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
