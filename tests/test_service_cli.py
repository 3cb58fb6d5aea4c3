"""`supercluster server init | server | login | usage`: a real server process on loopback, a token
stored 0600, usage as CSV through the server and as JSON from the local database."""

import csv
import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from supercluster.cli.main import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    code, out, _ = run(capsys, "server", "init", "--db", url, "--json")
    assert code == 0
    token = json.loads(out)["token"]
    code, _, err = run(capsys, "server", "init", "--db", url)
    assert code == 2 and "already initialized" in err
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "supercluster.cli.main", "server", "--port", str(port), "--db", url],
                            env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/docs", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stdout.read().decode()[-2000:]) from None
                time.sleep(0.3)
        yield base, token, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_login_stores_the_token_privately_and_usage_goes_through_the_server(server, capsys, monkeypatch):
    base, token, url = server
    code, _, err = run(capsys, "login", "--server", base, "--token", "sct_wrong")
    assert code == 2 and "401" in err
    code, out, _ = run(capsys, "login", "--server", base, "--token", token)
    assert code == 0 and "operator" in out
    stored = os.path.join(os.environ["SUPERCLUSTER_HOME"], "service.json")
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o600
    assert json.loads(open(stored).read()) == {"server": base, "token": token}

    from supercluster.service.client import call

    call(base, "POST", "/v1/orgs", body={"name": "acme"})  # the stored token is used
    call(base, "POST", "/v1/orgs/acme/projects", body={"name": "llm"})
    code, out, _ = run(capsys, "usage", "--server", base, "--csv", "--by", "org")
    assert code == 0 and next(csv.reader(io.StringIO(out)))[:4] == ["org", "project", "user", "gpu_type"]
    monkeypatch.setenv("SUPERCLUSTER_SERVER", base)
    code, out, _ = run(capsys, "usage", "--json")
    assert code == 0 and json.loads(out) == {"by": "project", "rows": []}
    monkeypatch.delenv("SUPERCLUSTER_SERVER")
    code, out, _ = run(capsys, "usage", "--db", url, "--json", "--since", "2026-01-01")  # no server: the local database
    assert code == 0 and json.loads(out)["rows"] == []
    code, _, err = run(capsys, "usage", "--db", url, "--by", "team")
    assert code == 2 and "--by 'team'" in err
