"""`supercluster server init | server | login | usage`: a real server process on loopback, a token
stored 0600, usage as CSV through the server and as JSON from the local database; and the
`cluster` and `job` commands as the server's clients (--server, $SUPERCLUSTER_SERVER, --project); the
operator's `org | project | user | token | quota | node` commands, each a client of the API."""

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
from pathlib import Path

import httpx
import pytest
import tomli_w

from supercluster.cli.main import main
from supercluster.service.client import call


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
    code, _, err = run(capsys, "server", "init", "--backend", "local", "--db", url)
    assert code == 2 and "already initialized" in err  # nothing changed: the fleet is checked after that
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
    # one client path: the local database's client answers in the same shape, what the server keeps to itself None
    monkeypatch.delenv("SUPERCLUSTER_SERVER")
    (local,) = json.loads(run(capsys, "cluster", "list", "--db", url, "--json")[1])
    monkeypatch.setenv("SUPERCLUSTER_SERVER", base)
    assert list(local) == list(listed[0]) and local["name"].endswith(".dev") and local["project"] is None
    assert local["nodes"][0]["name"] == listed[0]["nodes"][0]["name"] and local["switches"] == listed[0]["switches"]
    assert local["lower_bound"] == 1 and listed[0]["lower_bound"] is None
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
    assert job["run_dir"] is None and job["config"] is None  # the local client's keys; the server keeps its paths
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


def test_operator_commands_through_the_server(server, capsys, monkeypatch):
    """org, project, user, token, quota and node commands: each a client of the API, refused
    with the server's sentence where the token may not, and `node undrain` audited."""
    base, op_token, url = server
    code, _, err = run(capsys, "org", "create", "acme")  # no server named
    assert code == 2 and "Organizations live on a server: pass --server URL" in one_error_line(err)
    monkeypatch.setenv("SUPERCLUSTER_SERVER", base)
    assert run(capsys, "login", "--token", op_token)[0] == 0
    assert run(capsys, "org", "create", "acme") == (0, "organization acme created\n", "")
    code, _, err = run(capsys, "org", "create", "acme")
    assert code == 2 and "409: A organization named 'acme' already exists" in one_error_line(err)
    assert run(capsys, "project", "create", "llm", "--org", "acme")[1] == "project llm created in organization acme\n"
    code, _, err = run(capsys, "project", "create", "web", "--org", "nope")
    assert code == 2 and "404: No organization named 'nope'" in one_error_line(err)
    assert run(capsys, "user", "create", "ada", "--org", "acme")[1] == "user ada created in organization acme\n"
    code, _, err = run(capsys, "token", "create", "--user", "ada", "--project", "llm", "--role", "root")
    assert code == 2 and "422: Field 'role'" in one_error_line(err)
    code, out, _ = run(capsys, "token", "create", "--user", "ada", "--project", "llm", "--role", "member", "--days", "2", "--json")
    ada = json.loads(out)
    assert code == 0 and (ada["user"], ada["project"], ada["role"]) == ("ada", "llm", "member") and ada["token"].startswith("sct_")
    assert ada["expires_at"] - ada["created_at"] == pytest.approx(2 * 86400, abs=5)
    code, out, _ = run(capsys, "token", "create", "--user", "ada", "--project", "llm")
    assert code == 0 and out.splitlines()[-1].startswith("sct_") and "viewer in llm" in out  # the secret alone, last
    code, out, _ = run(capsys, "quota", "set", "--gpu-type", "local", "--max-gpus", "2", "--project", "llm")
    assert code == 0 and out == "quota of project llm on local: max_gpus 2, gpu_hours unlimited, max_priority 0\n"
    code, _, err = run(capsys, "quota", "set", "--gpu-type", "local", "--max-gpus", "2")
    assert code == 2 and "pass --project NAME" in one_error_line(err)  # the operator's token has no project

    # a drained node: a new cluster waits and says why; undraining it starts the cluster
    node = call(base, "GET", "/v1/fleet")["node_list"][0]["name"]
    assert run(capsys, "node", "drain", node, "--reason", "fan replaced")[1] == f"node {node} drained (fan replaced)\n"
    code, out, _ = run(capsys, "cluster", "create", "c1", "--gpus", "2", "--project", "llm")
    assert code == 0 and "queued (position 1)" in out and "waiting for drained nodes" in out and node in out, out
    code, out, _ = run(capsys, "node", "undrain", node)
    assert code == 0 and out == f"node {node} back in service; started llm/c1\n"
    assert json.loads(run(capsys, "cluster", "show", "c1", "--project", "llm", "--json")[1])["state"] == "ready"
    code, _, err = run(capsys, "node", "undrain", node)
    assert code == 2 and f"Node '{node}' is already up" in one_error_line(err)
    code, _, err = run(capsys, "node", "undrain", "nosuch")
    assert code == 2 and "404: No node 'nosuch' in the fleet" in one_error_line(err)
    audited = [(a["method"], a["path"], a["status"]) for a in call(base, "GET", "/v1/audit")]
    assert ("POST", f"/v1/fleet/nodes/{node}/undrain", 200) in audited and ("POST", "/v1/fleet/nodes/nosuch/undrain", 404) in audited

    # a member may not act as the operator; a revoked token stops working at once
    assert run(capsys, "login", "--token", ada["token"])[0] == 0
    for args in (("node", "undrain", node), ("org", "create", "globex"), ("quota", "set", "--gpu-type", "local", "--max-gpus", "9")):
        code, _, err = run(capsys, *args)
        assert code == 2 and "403: " in one_error_line(err), args
    assert run(capsys, "login", "--token", op_token)[0] == 0
    assert run(capsys, "token", "revoke", str(ada["id"]))[1] == f"token {ada['id']} of ada revoked\n"
    code, _, err = run(capsys, "login", "--token", ada["token"])
    assert code == 2 and "401: This token was revoked" in one_error_line(err)


def test_server_init_names_how_to_create_a_missing_postgresql_database(capsys):
    url = "postgresql://postgres@127.0.0.1:5432/sc_missing_database_for_this_test"
    code, _, err = run(capsys, "server", "init", "--db", url)
    if "does not exist" not in err:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 did not answer as expected: {err.strip()}")
    assert code == 2 and one_error_line(err) == (
        "error: The PostgreSQL database 'sc_missing_database_for_this_test' does not exist; create it with "
        "`createdb -h 127.0.0.1 -p 5432 -U postgres sc_missing_database_for_this_test` (or `CREATE DATABASE "
        "sc_missing_database_for_this_test` in psql), then run the command again.\n")


@pytest.mark.parametrize("args, words", [
    (("login", "--server", "127.0.0.1:8765", "--token", "sct_x"), "The server '127.0.0.1:8765' is not a URL"),
    (("login", "--server", "http://[bad", "--token", "sct_x"), "The server 'http://[bad' is not a URL"),
    (("login", "--server", "http://127.0.0.1:99999", "--token", "sct_x"), "is not a URL"),
    (("cluster", "list", "--server", "foo"), "The server 'foo' is not a URL"),
    (("login", "--server", "http://127.0.0.1:1", "--token", "  "), "The token is empty"),
    (("usage", "--json", "--csv"), "--json and --csv cannot be used together"),
])
def test_bad_input_is_one_sentence(capsys, args, words):
    code, _, err = run(capsys, *args)
    assert code == 2 and words in one_error_line(err)


def test_server_init_keeps_a_fleet_it_finds_and_refuses_to_replace_it(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert run(capsys, "fleet", "init", "--backend", "local", "--gpus", "3", "--db", url)[0] == 0
    code, _, err = run(capsys, "server", "init", "--gpus", "2", "--db", url)
    assert code == 2 and "The database already has a fleet; leave out --backend and --gpus" in err and err.count("\n") == 1
    code, out, _ = run(capsys, "server", "init", "--db", url, "--json")
    assert code == 0 and json.loads(out)["fleet"] is None and json.loads(out)["token"].startswith("sct_")
    assert json.loads(run(capsys, "fleet", "show", "--db", url, "--json")[1])["gpus"] == 3


def test_local_usage_counts_the_fleet_s_own_clusters_and_its_csv_has_the_token_columns(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    assert run(capsys, "fleet", "init", "--backend", "local", "--gpus", "2", "--db", url)[0] == 0
    assert run(capsys, "cluster", "create", "dev", "--gpus", "1", "--owner", "team-a", "--db", url)[0] == 0
    code, out, _ = run(capsys, "usage", "--db", url, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["owner"], r["gpu_type"]) for r in rows] == [("team-a", "local")] and float(rows[0]["gpu_seconds"]) > 0
    assert list(rows[0])[-4:] == ["endpoint", "requests", "prompt_tokens", "completion_tokens"]
    code, out, _ = run(capsys, "usage", "--db", url)
    assert code == 0 and "team-a" in out


def test_server_workers_share_one_port_and_one_database_and_stop_together(tmp_path, capsys):
    import concurrent.futures

    url = f"sqlite:///{tmp_path / 'service.db'}"
    code, out, _ = run(capsys, "server", "init", "--gpus", "2", "--db", url, "--json")
    assert code == 0
    h = {"Authorization": f"Bearer {json.loads(out)['token']}"}
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "supercluster.cli.main", "server", "--port", str(port), "--db", url,
                             "--workers", "2"], env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def children() -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    try:
        assert "2 worker processes" in proc.stdout.readline().decode()
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/docs", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.3)
        workers = children()
        assert len(workers) == 2

        def write_and_read(i):  # writes and reads spread over both workers, all in the one database
            with httpx.Client(base_url=base, headers=h, timeout=60) as c:
                r = c.post("/v1/orgs", json={"name": f"org{i}"})
                return r.status_code, c.get("/v1/orgs").status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(write_and_read, range(40)))
        assert answers == [(201, 200)] * 40
        names = {o["name"] for o in httpx.get(f"{base}/v1/orgs", headers=h, timeout=60).json()}
        assert {f"org{i}" for i in range(40)} <= names
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0 and not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
