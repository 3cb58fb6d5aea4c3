"""The README's "Operating the service" tour, run line by line as written: a real server process
on loopback, the operator's commands, a tenant's token, a training job and usage, on
SQLite as written (every service test that touches the database also runs on PostgreSQL). Only
the values of the variables its `export` line sets come from here."""

import csv
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- operator-tour: begin -->", "<!-- operator-tour: end -->"


def tour_lines() -> list[str]:
    """The commands between the README's markers, inside its ```bash fence."""
    block = ROOT.joinpath("README.md").read_text().split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block.startswith("```bash\n") and block.endswith("\n```"), "the tour is one fenced bash block"
    return [line for line in block.splitlines()[1:-1] if line.strip() and not line.lstrip().startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shim(bin_dir: Path) -> None:
    """`supercluster` on PATH as this checkout's code under this interpreter."""
    bin_dir.mkdir()
    exe = bin_dir / "supercluster"
    exe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m supercluster.cli.main \"$@\"\n")
    exe.chmod(0o755)


@pytest.mark.slow
def test_the_readme_operator_tour_runs_as_written(tmp_path):
    lines = tour_lines()
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "tiny.toml", work / "configs")
    _shim(tmp_path / "bin")
    import supercluster

    port = _free_port()
    server_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(Path(supercluster.__file__).parents[1]), "SUPERCLUSTER_HOME": str(tmp_path / "home"),
           "DB": f"sqlite:///{work / 'sc.db'}", "PORT": str(port), "SUPERCLUSTER_SERVER": server_url, "COLUMNS": "200"}
    env.pop("SUPERCLUSTER_DB", None)
    env.pop("SUPERCLUSTER_PROJECT", None)

    outputs: dict[str, str] = {}
    server = None
    try:
        for line in lines:
            if line.startswith("export "):
                names = {word.split("=", 1)[0] for word in shlex.split(line)[1:]}
                assert names == {"DB", "PORT", "SUPERCLUSTER_SERVER"}, "the test supplies exactly these"
                continue
            command = re.sub(r"\s+#.*$", "", line)
            if command.endswith("&"):  # the server: started, and read until it says where it listens
                assert server is None
                server = subprocess.Popen(["bash", "-c", f"exec {command[:-1]}"], cwd=work, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
                watchdog = threading.Timer(120, server.kill)  # a server that never says so fails the test, not hangs it
                watchdog.start()
                first = server.stdout.readline()
                watchdog.cancel()
                outputs[line] = first
                assert first.startswith(f"serving the API on {server_url}/v1") and f"{server_url}/dashboard" in first, first
                continue
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=work, env=env, text=True,
                                  capture_output=True, timeout=600)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            outputs[line] = done.stdout
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    def out(prefix: str) -> str:
        [found] = [text for line, text in outputs.items() if line.startswith(prefix)]
        return found

    operator_token, ada_token = (work / "operator.token").read_text().strip(), (work / "ada.token").read_text().strip()
    assert operator_token.startswith("sct_") and ada_token.startswith("sct_") and operator_token != ada_token
    assert out("supercluster org create") == "organization acme created\n"
    assert out("supercluster project create") == "project llm created in organization acme\n"
    assert out("supercluster user create") == "user ada created in organization acme\n"
    assert "max_gpus 1, gpu_hours 10" in out("supercluster quota set")
    assert out("supercluster cluster create").startswith("cluster c1: 1 x local, ready")
    logins = [text for line, text in outputs.items() if line.startswith("supercluster login")]
    assert "as operator (admin in the fleet)" in logins[0] and "as ada (member in llm)" in logins[1]
    assert "clusters of project llm" in out("supercluster cluster list") and "c1" in out("supercluster cluster list")
    assert out("supercluster job status 1 --wait").startswith("job 1 on c1: completed")
    rows = list(csv.DictReader(io.StringIO(out("supercluster usage"))))
    assert [(r["org"], r["project"], r["gpu_type"]) for r in rows] == [("acme", "llm", "local")]
    assert float(rows[0]["gpu_seconds"]) > 0
