"""Shared fixtures. Every test session gets its own SUPERCLUSTER_HOME (caches, fleet DB)."""

import os
import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def supercluster_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("supercluster-home")
    old = os.environ.get("SUPERCLUSTER_HOME")
    os.environ["SUPERCLUSTER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SUPERCLUSTER_HOME", None)
    else:
        os.environ["SUPERCLUSTER_HOME"] = old


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of real Python source (a few stdlib packages, ~200 KB): tiny models learn it fast."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, src in enumerate(sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))[:8]):
        (root / f"{i:02d}_{src.name}").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return root
