"""Tests that need Slurm or PostgreSQL may skip on a developer's machine, never in CI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import test_cluster_state

SKIPPING_TESTS = '''
import pytest

@pytest.mark.slurm
def test_needs_slurm():
    pytest.skip("slurmd not installed")

@pytest.mark.postgres
def test_needs_postgres():
    pytest.skip("no server")

def test_unrelated():
    pytest.skip("not on this platform")
'''


def _pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "--rootdir", str(folder), str(folder)], env=env, capture_output=True, text=True, timeout=120)


def test_a_slurm_or_postgres_skip_fails_in_ci_only(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(SKIPPING_TESTS)
    local = _pytest(tmp_path, None)
    assert local.returncode == 0 and "3 skipped" in local.stdout, local.stdout
    ci = _pytest(tmp_path, "true")
    assert ci.returncode == 1 and "2 failed, 1 skipped" in ci.stdout, ci.stdout
    assert "a slurm test skipped in CI (slurmd not installed)" in ci.stdout


@pytest.mark.postgres
def test_postgres_skips_only_when_no_server_listens(monkeypatch):
    if reason := test_cluster_state._pg_unavailable():
        pytest.skip(reason)
    # a server that answers but refuses (here: no such database) is a failure to see, not a skip
    monkeypatch.setattr(test_cluster_state, "PG_URL", "postgresql://postgres@127.0.0.1:5432/no_such_database_x")
    assert test_cluster_state._pg_unavailable() is None
    # nobody listening is the one reason to skip
    monkeypatch.setattr(test_cluster_state, "PG_URL", "postgresql://postgres@127.0.0.1:1/test")
    assert "no PostgreSQL server listens at 127.0.0.1:1" in test_cluster_state._pg_unavailable()
