"""`supercluster server init | server | login | usage`: a real server process on loopback, a token
stored 0600, usage as CSV through the server and as JSON from the local database; and the
`cluster` and `job` commands as the server's clients (--server, $SUPERCLUSTER_SERVER, --project)."""

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
import tomli_w

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
    code, out, _ = run(capsys, "server", "init", "--gpus", "2", "--db", url, "--json")  # the fleet too, on the same URL
    assert code == 0
    answer = json.loads(out)
    token = answer["token"]
    assert (answer["fleet"]["backend"], answer["fleet"]["gpus"]) == ("local", 2)
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
    assert code == 0 and json.loads(out) == {"by": "project", "rows": [], "tokens": []}
    monkeypatch.delenv("SUPERCLUSTER_SERVER")
    code, out, _ = run(capsys, "usage", "--db", url, "--json", "--since", "2026-01-01")  # no server: the local database
    assert code == 0 and json.loads(out)["rows"] == []
    code, _, err = run(capsys, "usage", "--db", url, "--by", "team")
    assert code == 2 and "--by 'team'" in err


def _tenants(base, op_token) -> dict:
    """Project llm in org acme with a member and a viewer; the tokens by role."""
    from supercluster.service.client import call

    call(base, "POST", "/v1/orgs", token=op_token, body={"name": "acme"})
    call(base, "POST", "/v1/orgs/acme/projects", token=op_token, body={"name": "llm"})
    tokens = {}
    for role in ("member", "viewer"):
        call(base, "POST", "/v1/users", token=op_token, body={"name": f"llm-{role}", "org": "acme"})
        tokens[role] = call(base, "POST", "/v1/tokens", token=op_token,
                            body={"user": f"llm-{role}", "project": "llm", "role": role})["token"]
    return tokens


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_cluster_commands_go_to_the_server_named_by_flag_or_environment(server, capsys, monkeypatch):
    base, op_token, url = server
    tokens = _tenants(base, op_token)
    assert run(capsys, "login", "--server", base, "--token", op_token)[0] == 0
    code, _, err = run(capsys, "cluster", "list", "--server", base)
    assert code == 2 and "pass --project" in one_error_line(err)  # the operator's token has no project of its own
    code, out, _ = run(capsys, "cluster", "list", "--server", base, "--project", "llm", "--json")
    assert code == 0 and json.loads(out) == []

    code, out, _ = run(capsys, "login", "--server", base, "--token", tokens["member"])
    assert code == 0 and "llm-member (member in llm)" in out
    code, out, err = run(capsys, "cluster", "create", "dev", "--gpus", "1", "--server", base)  # project: the token's
    assert code == 0 and out.startswith("cluster dev: 1 x ") and "ready" in out, err
    code, _, err = run(capsys, "cluster", "create", "dev", "--gpus", "1", "--server", base)
    assert code == 2 and "409: Project 'llm' already has a cluster named 'dev'" in one_error_line(err)
    code, _, err = run(capsys, "cluster", "create", "tagged", "--gpus", "1", "--owner", "ml", "--server", base)
    assert code == 2 and "--owner works on the local database only" in one_error_line(err)

    monkeypatch.setenv("SUPERCLUSTER_SERVER", base)
    code, out, _ = run(capsys, "cluster", "list", "--json")
    listed = json.loads(out)
    assert code == 0 and [(c["name"], c["project"], c["state"], c["gpus"]) for c in listed] == [("dev", "llm", "ready", 1)]
    code, out, _ = run(capsys, "cluster", "list")
    assert code == 0 and "clusters of project llm" in out and "dev" in out and "ready" in out
    code, out, _ = run(capsys, "cluster", "show", "dev", "--json")
    assert code == 0 and json.loads(out)["nodes"] == listed[0]["nodes"] and len(listed[0]["nodes"]) == 1
    code, out, _ = run(capsys, "cluster", "show", "dev")
    assert code == 0 and out.startswith("cluster dev: 1 x ") and "nodes:" in out
    monkeypatch.setenv("SUPERCLUSTER_PROJECT", "web")
    code, _, err = run(capsys, "cluster", "show", "dev")
    assert code == 2 and "404: No project named 'web' is visible to this token." in one_error_line(err)
    monkeypatch.delenv("SUPERCLUSTER_PROJECT")
    code, _, err = run(capsys, "cluster", "list", "--db", url)
    assert code == 2 and "--db and --server" in one_error_line(err)

    # a viewer reads, and is refused with the server's sentence when it would change anything
    assert run(capsys, "login", "--server", base, "--token", tokens["viewer"])[0] == 0
    assert json.loads(run(capsys, "cluster", "list", "--json")[1])[0]["name"] == "dev"
    for args in (("cluster", "create", "mine", "--gpus", "1"), ("cluster", "delete", "dev")):
        code, _, err = run(capsys, *args)
        assert code != 0 and "403: This needs the member role; your token has viewer." in one_error_line(err)

    assert run(capsys, "login", "--server", base, "--token", tokens["member"])[0] == 0
    code, out, _ = run(capsys, "cluster", "delete", "dev", "--json")
    assert code == 0 and json.loads(out) == {"deleted": "dev", "started": []}
    code, _, err = run(capsys, "cluster", "show", "dev")
    assert code == 2 and "404: Project 'llm' has no cluster named 'dev'." in one_error_line(err)
    monkeypatch.delenv("SUPERCLUSTER_SERVER")
    code, _, err = run(capsys, "cluster", "list", "--server", "http://127.0.0.1:1")
    assert code == 2 and "No token for http://127.0.0.1:1" in one_error_line(err)  # the stored token is another server's
    code, out, _ = run(capsys, "cluster", "list", "--json", "--db", url)  # no server: the local database, as before
    assert code == 0 and [c["name"] for c in json.loads(out)] == []


@pytest.mark.slow
def test_job_commands_through_the_server(server, capsys, tmp_path, library_corpus):
    base, op_token, _ = server
    tokens = _tenants(base, op_token)
    assert run(capsys, "login", "--server", base, "--token", tokens["member"])[0] == 0
    remote = ("--server", base)
    assert run(capsys, "cluster", "create", "dev", "--gpus", "1", *remote)[0] == 0
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps({
        "data": {"path": str(library_corpus)}, "model": {"preset": "tiny"},
        "train": {"steps": 3, "checkpoint_every": 3, "eval_every": 100, "precision": "fp32", "seq_len": 32,
                  "micro_batch": 2, "global_batch": 2}}))
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nstep = 3\n')
    code, _, err = run(capsys, "job", "submit", str(bad), "--cluster", "dev", *remote)
    assert code == 2 and "Unknown config key 'train.step'" in one_error_line(err)  # refused here, nothing sent

    code, out, err = run(capsys, "job", "submit", str(config), "--cluster", "dev", "--max-restarts", "0", "--json", *remote)
    assert code == 0, err
    job = json.loads(out)
    jid = job["id"]
    assert job["cluster"] == "dev" and job["state"] in ("pending", "running") and job["max_restarts"] == 0
    code, out, _ = run(capsys, "job", "list", "--json", *remote)
    assert code == 0 and [j["id"] for j in json.loads(out)] == [jid]
    code, out, _ = run(capsys, "job", "list", *remote)
    assert code == 0 and "jobs of project llm" in out and "dev" in out
    code, out, _ = run(capsys, "job", "list", "--cluster", "other", "--json", *remote)
    assert code == 0 and json.loads(out) == []
    code, followed, _ = run(capsys, "job", "logs", str(jid), "--follow", *remote)  # streams until the job ends
    assert code == 0 and "step" in followed
    code, out, _ = run(capsys, "job", "status", str(jid), "--wait", *remote)
    assert code == 0 and out.startswith(f"job {jid} on dev: completed") and "exit code 0" in out, followed[-2000:]
    code, out, _ = run(capsys, "job", "logs", str(jid), *remote)
    assert code == 0 and out == followed

    code, out, _ = run(capsys, "job", "submit", str(config), "--cluster", "dev", "--set", "train.steps=10000", "--json", *remote)
    jid2 = json.loads(out)["id"]
    code, out, _ = run(capsys, "job", "cancel", str(jid2), *remote)
    assert code == 0 and out.startswith(f"job {jid2} on dev: cancelled")
    code, out, _ = run(capsys, "job", "status", str(jid2), "--json", *remote)
    assert code == 0 and json.loads(out)["state"] == "cancelled"
    code, _, err = run(capsys, "job", "cancel", str(jid2), *remote)
    assert code != 0 and "409" in one_error_line(err)

    assert run(capsys, "login", "--server", base, "--token", tokens["viewer"])[0] == 0
    code, _, err = run(capsys, "job", "submit", str(config), "--cluster", "dev", *remote)
    assert code != 0 and "403: This needs the member role; your token has viewer." in one_error_line(err)
    assert run(capsys, "job", "status", str(jid), *remote)[0] == 0  # reading is a viewer's right
