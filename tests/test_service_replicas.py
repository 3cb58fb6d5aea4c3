"""Endpoints that scale: replicas behind the service's router. Load scales out within [min, max]
and idleness back in, a replica killed mid-load is replaced while every call still succeeds, two
replicas both answer and shared prompts keep to one of them (prefix affinity), and an endpoint
runs on Slurm nodes (the emulated slurm-wlm), its server bound to the node's address."""

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa

from slurm_emulator import EmulatedSlurm, unavailable_reason
from test_service_cli import run
from supercluster.service.router import Replica, Router, _weight, prefix_key

CHARS = 24  # the prefix affinity reads here (the tiny model's context is 128 tokens)


@pytest.fixture(scope="module")
def tiny_model(tiny_run, supercluster_home):
    """The shared tiny run, copied into the fleet's model library (where endpoints serve from)."""
    return shutil.copytree(tiny_run, supercluster_home / "models" / "tiny-replicas").name


@contextlib.contextmanager
def service(start_service, backend: str):
    """The service with its scaler on (conftest's start_service); yields (client, a member's token of
    project llm). Its endpoints are deleted at the end: their servers stop."""
    # No rate limit to speak of: four callers in a closed loop on a tiny model can pass the default
    # 50 calls/s of their token, and the test's own polling with it would then be refused (429).
    with start_service(backend, scale=True, rate=1e4, burst=10**4) as (base, _, grant), httpx.Client(base_url=base, timeout=120) as c:
        token = grant("acme", "llm", "member")
        try:
            yield c, token
        finally:
            for e in c.get("/v1/projects/llm/endpoints", headers=bearer(token)).json():
                c.delete(f"/v1/projects/llm/endpoints/{e['name']}", headers=bearer(token))


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def until(what, timeout: float = 120, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while not (result := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {what.__doc__ or what}"
        time.sleep(every)
    return result


def served(client, token, name="chat") -> dict:
    return client.get(f"/v1/projects/llm/endpoints/{name}", headers=bearer(token)).json()


def ready_servers(endpoint: dict) -> list[dict]:
    return [s for s in endpoint["servers"] if s["state"] == "ready"]


def per_replica(endpoint: dict) -> dict[int, int]:
    counts: dict[int, int] = {}
    for s in endpoint["servers"]:  # an index's ended replicas and its replacement: one slot of the router
        counts[s["index"]] = counts.get(s["index"], 0) + s["requests"]
    return counts


def affine(prompt: str, indexes=(0, 1)) -> int:
    key = prefix_key({"prompt": prompt}, CHARS)
    return max(indexes, key=lambda i: _weight(key, i))


def test_the_router_prefers_the_affine_replica_within_its_slack():
    replicas = [Replica(0, "a"), Replica(1, "b")]
    router = Router(slack=2, chars=CHARS)
    key = "a shared system prompt"
    home = affine(key)
    picks = [router.pick(7, replicas, key).index for _ in range(4)]  # none done: the home fills to the slack
    assert picks == [home, home, home, 1 - home]
    assert router.load(7) == {home: 3, 1 - home: 1}
    assert router.pick(7, replicas, None).index == 1 - home  # no prompt: the least busy
    router.done(7, replicas[home], failed=True)
    assert router.pick(7, replicas, key).index == 1 - home  # a failed replica is avoided for a while
    assert router.pick(7, replicas, key, exclude={0, 1}) is None


@pytest.mark.slow
def test_replicas_scale_out_survive_a_kill_share_traffic_keep_prefixes_and_scale_in(tiny_model, start_service, tmp_path,
                                                                                   monkeypatch):
    """Three server starts in all: the first replica, the one load adds, and a killed one's replacement."""
    for var, value in (("SUPERCLUSTER_SCALE_EVERY_S", "0.5"), ("SUPERCLUSTER_SCALE_OUT_QUEUE", "1"),
                       ("SUPERCLUSTER_SCALE_OUT_TTFT_S", "1000"), ("SUPERCLUSTER_SCALE_IN_IDLE_S", "5"),
                       ("SUPERCLUSTER_AFFINITY_CHARS", str(CHARS))):
        monkeypatch.setenv(var, value)
    with service(start_service, "local") as (client, token):
        r = client.post("/v1/projects/llm/endpoints", headers=bearer(token),
                        json={"name": "chat", "cluster": "here", "run_dir": tiny_model, "max_replicas": 2})
        assert r.status_code == 404  # no cluster yet
        assert client.post("/v1/projects/llm/clusters", headers=bearer(token), json={"name": "here", "gpus": 2}).json()["state"] == "ready"
        r = client.post("/v1/projects/llm/endpoints", headers=bearer(token),
                        json={"name": "chat", "cluster": "here", "run_dir": tiny_model, "max_replicas": 2})
        assert r.status_code == 202 and (r.json()["min_replicas"], r.json()["max_replicas"]) == (1, 2), r.text
        until(lambda: ready_servers(served(client, token)))
        oai = openai.OpenAI(base_url=f"{client.base_url}/v1/projects/llm/endpoints/chat/v1", api_key=token, max_retries=0)

        # load: 4 callers on 1 replica is over 1 request per replica, so a second starts (never past
        # the max); then replica 1 is killed mid-load. Every call still succeeds, and a replacement
        # takes its place. Once the scaler has decided, two callers go on (busy enough to keep two
        # replicas): room for the new servers to load on a small machine.
        stop, fewer, failures, answered = threading.Event(), threading.Event(), [], []

        def load(seed: int):
            n = 0
            while not stop.is_set() and not (seed >= 2 and fewer.is_set()):
                n += 1
                try:
                    out = oai.completions.create(model="chat", prompt=f"class C{seed}_{n}:", max_tokens=8, temperature=0)
                    answered.append(out.usage.completion_tokens)
                except openai.APIError as err:
                    failures.append(repr(err))

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        until(lambda: served(client, token)["replicas"] == 2)
        fewer.set()
        up = until(lambda: len(ready_servers(e := served(client, token))) == 2 and e)
        assert up["replicas"] == 2
        with sa.create_engine(f"sqlite:///{tmp_path / 'service.db'}").connect() as conn:
            port, job = conn.execute(sa.text("SELECT port, job_id FROM svc_endpoint_replicas "
                                             "WHERE state = 'ready' AND \"index\" = 1")).one()
        os.kill(server_pid(port), signal.SIGKILL)
        until(lambda: [s for s in ready_servers(served(client, token)) if s["index"] == 1 and s["job_id"] != job])
        before = per_replica(served(client, token))[1]
        until(lambda: per_replica(served(client, token))[1] > before)  # the replacement answers in the killed one's place
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not failures, failures[:3]
        assert len(answered) >= 4 and all(n == 8 for n in answered)
        assert served(client, token)["replicas"] == 2  # the max

        # both replicas answer (before the idle cooldown): three prompts whose prefixes hash to each
        base = per_replica(served(client, token))

        def added() -> dict[int, int]:
            return {i: n - base[i] for i, n in per_replica(served(client, token)).items()}

        prompts = [f"def f{i}(x):" for i in range(40)]
        mine = {i: [p for p in prompts if affine(p) == i][:3] for i in (0, 1)}
        for p in mine[0] + mine[1]:
            assert oai.completions.create(model="chat", prompt=p, max_tokens=2, temperature=0).usage.completion_tokens == 2
        assert added() == {0: 3, 1: 3}
        # a shared prefix keeps to its replica, whatever follows it
        shared = "You are a helpful assistant. "  # past the characters affinity reads
        for i in range(4):
            oai.completions.create(model="chat", prompt=shared + f"Question {i}?", max_tokens=2, temperature=0)
        home = affine(shared)
        assert added() == {home: 7, 1 - home: 3}
        # usage stays per user (and per replica above)
        rows = client.get("/v1/usage?by=user", headers=bearer(token)).json()["tokens"]
        assert [(r["user"], r["requests"]) for r in rows] == [("llm-member", sum(per_replica(served(client, token)).values()))]

        # idle: back to the minimum after the cooldown, the lowest index kept
        down = until(lambda: (e := served(client, token))["replicas"] == 1 and len(ready_servers(e)) == 1 and e, timeout=60)
        assert [s["index"] for s in ready_servers(down)] == [0] and down["state"] == "ready"


def server_pid(port: int) -> int:
    """The model server listening on `port` (not its runner, which has the same argv after its own)."""
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = path.read_bytes().split(b"\0")
            if argv[1:4] == [b"-m", b"supercluster.cli.main", b"serve"] and str(port).encode() in argv:
                return int(path.parent.name)
    raise AssertionError(f"no model server on port {port}")


def test_replica_bounds_are_checked(start_service, capsys):
    with service(start_service, "local") as (client, token):
        for body, words in (({"min_replicas": 0}, "min_replicas must be between 1 and 16"),
                            ({"min_replicas": 3, "max_replicas": 2}, "max_replicas must be between min_replicas (3)"),
                            ({"max_replicas": 17}, "got 17")):
            r = client.post("/v1/projects/llm/endpoints", headers=bearer(token),
                            json={"name": "e", "cluster": "here", "run_dir": "m", **body})
            assert r.status_code == 400 and words in r.json()["detail"], r.text
        assert client.get("/v1/projects/llm/endpoints", headers=bearer(token)).json() == []
    code, _, err = run(capsys, "endpoint", "deploy", "e", "--cluster", "here", "--run-dir", "m", "--replicas", "2:x",
                       "--server", "http://127.0.0.1:9", "--project", "llm")
    assert code == 2 and "--replicas '2:x' is not MIN or MIN:MAX" in err


@pytest.mark.slurm
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_an_endpoint_on_slurm_nodes_answers_at_the_nodes_address(tmp_path, tiny_model, start_service, monkeypatch):
    emu = EmulatedSlurm(tmp_path / "slurm", nodes=2, gpus_per_node=2, nodes_per_leaf=2)
    emu.start()
    try:
        monkeypatch.setenv("SLURM_CONF", str(emu.conf))
        monkeypatch.setenv("SUPERCLUSTER_SCALE_EVERY_S", "0.5")
        with service(start_service, "slurm") as (client, token):
            cluster = client.post("/v1/projects/llm/clusters", headers=bearer(token), json={"name": "here", "gpus": 2})
            assert cluster.json()["state"] == "ready"
            r = client.post("/v1/projects/llm/endpoints", headers=bearer(token),
                            json={"name": "chat", "cluster": "here", "run_dir": tiny_model})
            assert r.status_code == 202, r.text
            until(lambda: ready_servers(served(client, token)), timeout=180)
            with sa.create_engine(f"sqlite:///{tmp_path / 'service.db'}").connect() as conn:
                url, job = conn.execute(sa.text("SELECT url, job_id FROM svc_endpoint_replicas")).one()
                command = conn.execute(sa.text("SELECT command FROM jobs WHERE id = :j"), {"j": job}).scalar_one()
                address = conn.execute(sa.text("SELECT DISTINCT address FROM nodes")).scalar_one()
            assert "0.0.0.0" in command and url.startswith(f"http://{address}:")  # bound to the node, reached there
            oai = openai.OpenAI(base_url=f"{client.base_url}/v1/projects/llm/endpoints/chat/v1", api_key=token, max_retries=0)
            assert oai.completions.create(model="chat", prompt="import os", max_tokens=3, temperature=0).usage.completion_tokens == 3
            r = client.delete("/v1/projects/llm/endpoints/chat", headers=bearer(token))
            assert r.status_code == 202 and r.json()["requests"] == 1, r.text
            until(lambda: served(client, token)["state"] == "stopped")  # stopping until its server is gone
    finally:
        emu.stop()


def test_an_endpoints_one_server_migrates_to_its_replica_0_and_back(service_url):
    from alembic import command
    from alembic.config import Config

    from supercluster.cluster.state import make_engine
    from supercluster.service.store import MIGRATIONS, Store

    Store(service_url).dispose()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = make_engine(service_url)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0005")
        conn.execute(sa.text("INSERT INTO svc_orgs (name, created_at) VALUES ('o', 0)"))
        conn.execute(sa.text("INSERT INTO svc_projects (org_id, name, created_at) SELECT id, 'p', 0 FROM svc_orgs"))
        conn.execute(sa.text("INSERT INTO svc_users (org_id, name, is_operator, created_at) SELECT id, 'u', false, 0 FROM svc_orgs"))
        conn.execute(sa.text("INSERT INTO svc_endpoints (project_id, user_id, name, cluster, run_dir, job_id, url, secret, "
                             "state, created_at) SELECT p.id, u.id, 'chat', 'c', '/r', 7, 'http://127.0.0.1:5000', 's', "
                             "'ready', 1 FROM svc_projects p, svc_users u"))
        command.upgrade(config, "0006")
        assert conn.execute(sa.text("SELECT \"index\", job_id, url, state FROM svc_endpoint_replicas")).all() == [
            (0, 7, "http://127.0.0.1:5000", "ready")]
        assert conn.execute(sa.text("SELECT min_replicas, max_replicas, replicas FROM svc_endpoints")).one() == (1, 1, 1)
        command.downgrade(config, "0005")
        assert conn.execute(sa.text("SELECT job_id, url FROM svc_endpoints")).one() == (7, "http://127.0.0.1:5000")
    engine.dispose()
