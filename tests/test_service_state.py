"""One cluster state, the fleet's: what the service shows and what it checks (job submit, endpoint
deploy) are read from the fleet, so they never disagree; the database of a service that kept its
own copy is migrated; quotas hold without a lock of the server's; and a job submit killed at its
worst moments leaves a job the tenant sees and can cancel, with exactly one runner, and no id given
out twice. On SQLite and PostgreSQL (`service_url`), on a local fleet of 2 GPUs: real job processes."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from supercluster.cluster.fleet import init_fleet
from supercluster.cluster.state import Job, make_engine
from supercluster.service import tenancy
from supercluster.service.app import create_app
from supercluster.service.models import ServiceJob
from supercluster.service.store import Store
from test_service_jobs import tiny_config


class Local:
    """The service on a local fleet of 2 GPUs, with one project `llm` and a member's token."""

    def __init__(self, url: str):
        self.url = url
        self.store = Store(url)
        with self.store.session() as s:
            self.op = {"Authorization": f"Bearer {tenancy.init_operator(s)}"}
        init_fleet(self.store.fleet, "local", gpus=2)
        self.client = TestClient(create_app(store=self.store))
        self.ok("POST", "/v1/orgs", self.op, {"name": "acme"})
        self.ok("POST", "/v1/orgs/acme/projects", self.op, {"name": "llm"})
        self.ok("POST", "/v1/users", self.op, {"name": "ann", "org": "acme"})
        self.token = self.ok("POST", "/v1/tokens", self.op, {"user": "ann", "project": "llm", "role": "member"})["token"]
        self.member = {"Authorization": f"Bearer {self.token}"}

    def ok(self, method: str, path: str, headers: dict, body=None):
        r = self.client.request(method, path, headers=headers, json=body)
        assert r.status_code < 300, (method, path, r.status_code, r.text)
        return r.json()

    def close(self):
        from supercluster.cluster import jobs

        for job in jobs.list_jobs(self.store.fleet):  # a failed test leaves no process running
            if job["state"] in ("pending", "running"):
                jobs.cancel_job(self.store.fleet, job["id"])
        self.client.close()
        self.store.dispose()


@pytest.fixture
def local(service_url):
    world = Local(service_url)
    yield world
    world.close()


def test_a_cluster_the_fleet_placed_later_takes_jobs_and_endpoints(local, library_corpus):
    """The issue's live bug: `later` queued behind `big`, `big` deleted, `later` shown ready but
    its job refused with 409 "is queued", from the service's stale copy of the state."""
    llm = "/v1/projects/llm"
    assert local.ok("POST", f"{llm}/clusters", local.member, {"name": "big", "gpus": 2})["state"] == "ready"
    later = local.ok("POST", f"{llm}/clusters", local.member, {"name": "later", "gpus": 2})
    assert later["state"] == "queued" and later["reason"].startswith("waiting for capacity: 0 of the fleet's 2"), later
    job = {"cluster": "later", "config": tiny_config(library_corpus, 10_000), "max_restarts": 0}
    r = local.client.post(f"{llm}/jobs", headers=local.member, json=job)
    assert r.status_code == 409 and r.json()["detail"] == "Cluster 'later' is queued; submit once it is ready."
    r = local.client.post(f"{llm}/endpoints", headers=local.member, json={"name": "e", "cluster": "later", "run_dir": "m"})
    assert r.status_code == 409 and "is queued; deploy once it is ready" in r.json()["detail"]

    local.ok("DELETE", f"{llm}/clusters/big", local.member)  # the fleet places `later` in the same transaction
    assert local.ok("GET", f"{llm}/clusters/later", local.member)["state"] == "ready"
    r = local.client.post(f"{llm}/jobs", headers=local.member, json=job)
    assert r.status_code == 202, r.text
    assert local.ok("DELETE", f"{llm}/jobs/{r.json()['id']}", local.member)["state"] == "cancelled"
    # deploy gets past the cluster's state to the run it is asked to serve (none in the library)
    r = local.client.post(f"{llm}/endpoints", headers=local.member, json={"name": "e", "cluster": "later", "run_dir": "m"})
    assert r.status_code == 422 and "holds no model yet" in r.json()["detail"], r.text


def test_a_database_with_the_old_copy_of_the_state_migrates_and_reads_the_fleet(service_url):
    """A service database at revision 0004 kept each cluster's state; 0005 drops it, keeping the rows."""
    from alembic import command
    from alembic.config import Config

    from supercluster.service.store import MIGRATIONS

    local = Local(service_url)
    local.ok("POST", "/v1/projects/llm/clusters", local.member, {"name": "big", "gpus": 2})
    local.ok("POST", "/v1/projects/llm/clusters", local.member, {"name": "later", "gpus": 2})
    local.ok("PUT", "/v1/projects/llm/quota", local.op, {"gpu_type": "local", "max_gpus": 4})
    local.ok("POST", "/v1/projects/llm/clusters", local.member, {"name": "more", "gpus": 2})  # 4 in use: it waits
    local.close()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = make_engine(service_url)
    with engine.begin() as conn:  # back to 0004, where the service kept a copy, then made stale
        config.attributes["connection"] = conn
        command.downgrade(config, "0004")
        states = dict(conn.execute(sa.text("SELECT name, state FROM svc_clusters")).all())
        assert states == {"big": "ready", "later": "queued", "more": "waiting"}  # the downgrade filled it from the fleet
        conn.execute(sa.text("DELETE FROM allocations"))  # as if `big` went and `later` took its node,
        conn.execute(sa.text("UPDATE clusters SET state = 'ready' WHERE name LIKE '%.later'"))  # the copy untouched
        conn.execute(sa.text("UPDATE clusters SET state = 'queued' WHERE name LIKE '%.big'"))
    engine.dispose()

    store = Store(service_url)
    assert store.revision == "0006"
    assert "state" not in {c["name"] for c in sa.inspect(store.fleet.engine).get_columns("svc_clusters")}
    client = TestClient(create_app(store=store))
    shown = {c["name"]: c for c in client.get("/v1/projects/llm/clusters", headers=local.member).json()}
    assert {n: c["state"] for n, c in shown.items()} == {"big": "queued", "later": "ready", "more": "waiting"}
    assert "4 of 4 local GPUs in use" in shown["more"]["reason"]
    r = client.post("/v1/projects/llm/jobs", headers=local.member, json={"cluster": "big", "config": {}})
    assert r.status_code == 409 and "'big' is queued" in r.json()["detail"]
    client.close()
    store.dispose()


def test_the_quota_holds_for_requests_at_once_without_a_server_lock(service_url):
    """Eight members' requests at once against a quota of 16 GPUs: two go to the fleet, six wait.
    The quota is decided in the fleet's transaction that creates the cluster, under the fleet's lock."""
    from test_service import World

    world = World(service_url)
    try:
        world.ok("PUT", "/v1/projects/llm/quota", world.op, {"gpu_type": "h100", "max_gpus": 16})
        token = world.tokens["llm", "member"]
        answers = []

        def create(i: int) -> None:
            r = world.call("POST", "/v1/projects/llm/clusters", token, {"name": f"c{i}", "gpus": 8})
            answers.append((r.status_code, r.json()["state"]))

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(answers) == [(202, "ready")] * 2 + [(202, "waiting")] * 6, answers
        quota = world.ok("GET", "/v1/projects/llm/quota", token)["quotas"][0]
        assert quota["used_gpus"] == 16
        shown = world.ok("GET", "/v1/projects/llm/clusters", token)
        assert sorted(c["state"] for c in shown) == ["ready"] * 2 + ["waiting"] * 6
        # one deleted: the oldest waiting one takes its place, and still no more than 16
        world.ok("DELETE", f"/v1/projects/llm/clusters/{next(c['name'] for c in shown if c['state'] == 'ready')}", token)
        shown = world.ok("GET", "/v1/projects/llm/clusters", token)
        assert sorted(c["state"] for c in shown) == ["ready"] * 2 + ["waiting"] * 5
    finally:
        world.close()


# ---- a submit killed midway (kill -9 of the server process) --------------------------------------

CHILD = """
import os, signal, sys
from fastapi.testclient import TestClient
from supercluster.cluster import jobs, launch
from supercluster.service.app import create_app
from supercluster.service.store import Store

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "before-start":  # the job and its service row committed, nothing started
    jobs._start_unstarted = die
else:  # "after-start": the runner started, the transaction that records it not committed
    launch.on_rollback = die
client = TestClient(create_app(store=Store(sys.argv[1])))
client.post("/v1/projects/llm/jobs", headers={"Authorization": "Bearer " + os.environ["TOKEN"]},
            json={"cluster": "here", "config": {"data": {"path": sys.argv[3]}, "model": {"preset": "tiny"},
                  "train": {"steps": 10000, "seq_len": 32, "micro_batch": 2, "global_batch": 4}}, "max_restarts": 0})
print("not killed")
"""


def runners(job_dir: str) -> list[int]:
    """The local backend's runner processes of a job dir (alive, not zombies)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"supercluster.cluster.backends.local" in argv and job_dir.encode() in argv and state != "Z":
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("moment", ["before-start", "after-start"])
def test_a_submit_killed_midway_leaves_one_visible_job(local, library_corpus, moment):
    local.ok("POST", "/v1/projects/llm/clusters", local.member, {"name": "here", "gpus": 2})
    child = subprocess.run([sys.executable, "-c", CHILD, local.url, moment, str(library_corpus)],
                           env={**os.environ, "TOKEN": local.token}, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    with local.store.reading() as s:  # both rows or neither: here both, with one id
        (job,) = s.scalars(sa.select(Job)).all()
        assert [sj.job_id for sj in s.scalars(sa.select(ServiceJob))] == [job.id]
        assert job.state == "pending" and job.backend_ref is None
    assert len(runners(job.job_dir)) == (1 if moment == "after-start" else 0)

    # the tenant sees it; looking brings the books up to date: started now, or its runner taken up
    (shown,) = local.ok("GET", "/v1/projects/llm/jobs", local.member)
    assert shown["id"] == job.id
    with local.store.reading() as s:
        ref = s.get(Job, job.id).backend_ref
    assert ref is not None and runners(job.job_dir) == [int(ref.split(":")[0])]  # one runner, the one the books name
    assert local.ok("GET", f"/v1/projects/llm/jobs/{job.id}", local.member)["state"] == "running"

    r = local.client.post("/v1/projects/llm/jobs", headers=local.member,
                          json={"cluster": "here", "config": tiny_config(library_corpus, 10_000), "max_restarts": 0})
    assert r.status_code == 202 and r.json()["id"] == job.id + 1  # never given out again
    for jid in (job.id, job.id + 1):
        assert local.ok("DELETE", f"/v1/projects/llm/jobs/{jid}", local.member)["state"] == "cancelled"


def test_a_cause_names_clusters_as_the_service_does(service_url):
    """The fleet records who preempted a cluster as data; the service words it: a tenant's cluster
    as project/name, one it did not make (the operator's, on the fleet itself) as another cluster."""
    from supercluster.cluster import clusters as fleet_clusters
    from test_service import World

    world = World(service_url)
    try:
        web, llm = world.tokens["web", "member"], world.tokens["llm", "member"]
        world.ok("POST", "/v1/projects/web/clusters", web, {"name": "big", "gpus": 128})
        world.ok("PUT", "/v1/projects/llm/quota", world.op, {"gpu_type": "h100", "max_priority": 5})
        world.ok("POST", "/v1/projects/llm/clusters", llm, {"name": "urgent", "gpus": 64, "priority": 5})
        big = world.ok("GET", "/v1/projects/web/clusters/big", web)
        assert big["reason"] == "preempted by cluster 'llm/urgent' (priority 5 over 0)"
        world.ok("DELETE", "/v1/projects/llm/clusters/urgent", llm)
        assert world.ok("GET", "/v1/projects/web/clusters/big", web)["state"] == "ready"

        fleet_clusters.create_cluster(world.store.fleet, "ops", 64, priority=9)  # the operator's, not the service's
        big = world.ok("GET", "/v1/projects/web/clusters/big", web)
        assert big["state"] == "queued" and big["reason"] == "preempted by another cluster (priority 9 over 0)"
        assert fleet_clusters.show_cluster(world.store.fleet, "p2.big")["detail"] == "preempted by cluster 'ops' (priority 9 over 0)"
    finally:
        world.close()


def test_a_name_race_answers_409_naming_the_name(local):
    """Six requests at once for one name, over real HTTP, for an organization, a project, a user, a
    cluster and an endpoint: one is made, the others answer 409 with the name the caller gave (not
    a 500 from the unique key on PostgreSQL, nor a 422 with the fleet's name for a cluster)."""
    import concurrent.futures
    import time

    import httpx
    import uvicorn

    from supercluster.paths import model_library

    (model_library() / "m").mkdir(parents=True, exist_ok=True)
    (model_library() / "m" / "config.toml").write_text("[model]\npreset = 'tiny'\n")  # enough to deploy; never answers
    server = uvicorn.Server(uvicorn.Config(create_app(store=local.store), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    root = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    try:
        def at_once(path: str, body: dict, n: int = 6, headers: dict = local.member) -> list[tuple[int, dict]]:
            start = threading.Barrier(n)

            def one(_):
                with httpx.Client(headers=headers, timeout=120) as c:
                    start.wait()
                    r = c.post(f"{root}/{path}", json=body)
                    return r.status_code, r.json()

            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                return list(pool.map(one, range(n)))

        for path, name, what in (("orgs", "globex", "organization"), ("orgs/acme/projects", "web", "project"),
                                 ("users", "bob", "user")):
            answers = at_once(path, {"name": name, **({"org": "acme"} if what == "user" else {})}, headers=local.op)
            assert sorted(code for code, _ in answers) == [201] + [409] * 5, answers
            assert all(code == 201 or answer["detail"] == f"A {what} named {name!r} already exists; choose another name."
                       for code, answer in answers), answers

        answers = at_once("projects/llm/clusters", {"name": "dup", "gpus": 1})
        assert sorted(code for code, _ in answers) == [202] + [409] * 5, answers
        for code, body in answers:
            assert code == 202 or body["detail"] == ("Project 'llm' already has a cluster named 'dup'; choose another "
                                                     "name or delete it first."), body
        shown = local.ok("GET", "/v1/projects/llm/clusters", local.member)
        assert [(c["name"], c["state"]) for c in shown] == [("dup", "ready")]

        answers = at_once("projects/llm/endpoints", {"name": "e", "cluster": "dup", "run_dir": "m"})
        assert sorted(code for code, _ in answers) == [202] + [409] * 5, answers
        assert all(code == 202 or "already has an endpoint named 'e'" in body["detail"] for code, body in answers), answers
        assert [e["name"] for e in local.ok("GET", "/v1/projects/llm/endpoints", local.member)] == ["e"]
        from supercluster.cluster import jobs

        assert len(jobs.list_jobs(local.store.fleet)) == 1  # the refused requests started no serving job
    finally:
        server.should_exit = True
        thread.join(timeout=30)
