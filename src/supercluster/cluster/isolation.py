"""Where a job may read and write, checked once, when it is submitted.

A job writes only to its own run directory, which the fleet sets last on the job's command line
(`backends.base.train_command`), after every override. It reads only inside the folders its
submitter may read: anything on the local fleet (one user), a project's own area, its own jobs'
folders and the shared model and data libraries through the service.

Every config key that names a path (`train.config.path_keys`, so a key added later is covered
too) is resolved here with symlinks followed and `..` folded, and a path to read is handed to the
job as that absolute path (a later override wins), so the job opens what was checked, not a
relative path read from another folder. Path checks are what the fleet can enforce while every
job runs as the service's own Unix user; ARCHITECTURE.md says what stronger isolation would take.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from supercluster.errors import UserError
from supercluster.train.config import get, load_config, path_keys, validate


class PathRefused(UserError):
    """A path a job may not touch (the service answers 403)."""


@dataclass(frozen=True)
class JobArea:
    """Where the submitter's jobs may read: `base` anchors relative paths; `readable` None means
    anywhere the submitter can read (the local fleet), else only inside these folders."""

    base: Path
    readable: tuple[Path, ...] | None = None
    owner: str = "this fleet's user"  # in messages: "project 'llm'"


def _inside(path: Path, roots) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def pin_paths(config: str | os.PathLike, overrides: list[str], area: JobArea) -> list[str]:
    """`overrides`, checked, plus one that pins each path to read to its checked absolute form.

    The config is loaded and validated now, so a job that cannot start is refused at submit.
    Raises PathRefused for a path outside the area, UserError for a config that is not valid.
    """
    cfg = load_config(config, overrides)
    validate(cfg)
    pinned = list(overrides)
    for key, mode in path_keys().items():
        value = get(cfg, key)
        if value is None:
            continue
        if mode == "write":
            # Relative without climbing out: a folder inside the job's own, fresh one (a config
            # written for `supercluster train`); the fleet puts the run in the job's run directory.
            if Path(value).is_absolute() or os.path.normpath(value).split(os.sep)[0] == "..":
                raise PathRefused(f"{key} = {value!r} is outside this job's own folder: a job writes only to the run "
                                  f"directory the fleet gives it; leave {key} out (or relative, as in configs/*.toml).")
            continue
        if isinstance(value, list):  # tables that each name a path (data.mix): each checked, the list pinned whole
            tables = [{**entry, "path": str(_readable(f"{key}[{i}].path", entry.get("path"), area))}
                      for i, entry in enumerate(value)]
            pinned.append(f"{key}={_toml_tables(tables)}")
            continue
        path = _readable(key, value, area)
        pinned.append(f"{key}={json.dumps(str(path))}")  # a TOML string, whatever the path looks like
    return pinned


def _readable(key: str, value, area: JobArea) -> Path:
    """`value` resolved against the area, or PathRefused when the submitter's jobs may not read there."""
    if not isinstance(value, str):
        raise PathRefused(f"{key} must be a path, got {value!r}.")
    path = (area.base / os.path.expanduser(value)).resolve()
    if area.readable is not None and not _inside(path, [r.resolve() for r in area.readable]):
        raise PathRefused(f"{key} = {value!r} is outside what {area.owner}'s jobs may read ({path} after following "
                          f"links); use a path in {', '.join(str(r) for r in area.readable[:3])} or one of its jobs' folders.")
    return path


def _toml_tables(tables: list[dict]) -> str:
    """A TOML array of inline tables on one line. tomli_w writes long arrays of tables as [[v]]
    sections, so only each scalar goes through it; the keys are bare words (`validate` checked them)."""
    import tomli_w

    def scalar(key, value) -> str:
        return tomli_w.dumps({key: value}).partition(" = ")[2].strip()

    return "[" + ", ".join("{" + ", ".join(f"{k} = {scalar(k, v)}" for k, v in t.items()) + "}" for t in tables) + "]"
