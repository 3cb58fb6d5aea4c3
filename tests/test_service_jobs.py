"""One real tiny training job through the service on the local backend: submitted with a project
token, its log streamed as server-sent events to the end, invisible to the other tenant; and a
cancel through the API."""

import json
import time

import pytest
from fastapi.testclient import TestClient

from supercluster.cluster.fleet import init_fleet
from supercluster.service import tenancy
from supercluster.service.app import create_app
from supercluster.service.store import Store


def tiny_config(corpus, steps: int) -> dict:
    return {"data": {"path": str(corpus)}, "model": {"preset": "tiny"},
            "train": {"steps": steps, "checkpoint_every": 3, "eval_every": 100, "precision": "fp32", "seq_len": 32,
                      "micro_batch": 2, "global_batch": 4}}


@pytest.fixture
def service(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'service.db'}")
    with store.session() as s:
        op = {"Authorization": f"Bearer {tenancy.init_operator(s)}"}
    init_fleet(store.fleet, "local", gpus=2)
    client = TestClient(create_app(store=store))
    tokens = {}
    for org, project in (("acme", "llm"), ("globex", "web")):
        client.post("/v1/orgs", headers=op, json={"name": org})
        client.post(f"/v1/orgs/{org}/projects", headers=op, json={"name": project})
        for role in ("member", "viewer"):
            client.post("/v1/users", headers=op, json={"name": f"{project}-{role}", "org": org})
            token = client.post("/v1/tokens", headers=op, json={"user": f"{project}-{role}", "project": project, "role": role}).json()["token"]
            tokens[project, role] = {"Authorization": f"Bearer {token}"}
    tokens["op"] = op
    yield client, tokens
    client.close()
    store.dispose()


def _sse(text: str) -> tuple[list[str], dict]:
    lines, end = [], None
    for event in text.strip().split("\n\n"):
        if event.startswith("event: end"):
            end = json.loads(event.split("data: ", 1)[1])
        else:
            lines.append(event.removeprefix("data: "))
    return lines, end


@pytest.mark.slow
def test_a_tiny_job_runs_and_streams_its_log(service, library_corpus):
    client, tokens = service
    member, viewer, other = tokens["llm", "member"], tokens["llm", "viewer"], tokens["web", "member"]
    assert client.post("/v1/projects/llm/clusters", headers=member, json={"name": "here", "gpus": 2}).json()["state"] == "ready"
    r = client.post("/v1/projects/llm/jobs", headers=member,
                    json={"cluster": "here", "config": tiny_config(library_corpus, 4), "max_restarts": 0})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("pending", "running") and job["cluster"] == "here" and "job_dir" not in job
    jid = job["id"]
    for method, path in (("GET", f"/jobs/{jid}"), ("GET", f"/jobs/{jid}/logs"), ("DELETE", f"/jobs/{jid}")):
        r = client.request(method, f"/v1/projects/web{path}", headers=other)
        assert r.status_code == 404 and "here" not in r.text
        r = client.request(method, f"/v1/projects/llm{path}", headers=other)
        assert r.status_code == 404
    assert client.get("/v1/projects/web/jobs", headers=other).json() == []
    assert client.delete(f"/v1/projects/llm/jobs/{jid}", headers=viewer).status_code == 403
    r = client.delete("/v1/projects/llm/clusters/here", headers=member)
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]

    r = client.get(f"/v1/projects/llm/jobs/{jid}/logs?follow=true&timeout_s=300", headers=viewer)
    assert r.headers["content-type"].startswith("text/event-stream")
    lines, end = _sse(r.text)
    status = client.get(f"/v1/projects/llm/jobs/{jid}", headers=viewer).json()
    assert end == {"state": "completed"} and status["state"] == "completed" and status["exit_code"] == 0, "\n".join(lines[-30:])
    assert any("step" in line for line in lines)
    assert [j["id"] for j in client.get("/v1/projects/llm/jobs", headers=viewer).json()] == [jid]

    # a second job, cancelled through the API; cancelling it again is refused
    jid2 = client.post("/v1/projects/llm/jobs", headers=member,
                       json={"cluster": "here", "config": tiny_config(library_corpus, 10_000), "max_restarts": 0}).json()["id"]
    assert client.delete(f"/v1/projects/llm/jobs/{jid2}", headers=member).json()["state"] == "cancelled"
    assert client.delete(f"/v1/projects/llm/jobs/{jid2}", headers=member).status_code == 409
    assert client.delete("/v1/projects/llm/clusters/here", headers=member).status_code == 200


def test_jobs_need_a_ready_cluster_of_the_project(service, library_corpus):
    client, tokens = service
    member = tokens["llm", "member"]
    r = client.post("/v1/projects/llm/jobs", headers=member, json={"cluster": "none", "config": {}})
    assert r.status_code == 404 and "no cluster named 'none'" in r.json()["detail"]
    client.post("/v1/projects/web/clusters", headers=tokens["web", "member"], json={"name": "theirs", "gpus": 2})
    r = client.post("/v1/projects/llm/jobs", headers=member, json={"cluster": "theirs", "config": {}})
    assert r.status_code == 404
    r = client.post("/v1/projects/llm/jobs", headers=member, json={"cluster": "x", "config": {}, "overrides": ["nodot=1"]})
    assert r.status_code == 404  # the cluster is checked first; nothing was launched


@pytest.mark.slow
def test_a_preempted_job_resumes_from_the_step_it_was_stopped_at(service, library_corpus, tmp_path):
    client, tokens = service
    web, llm = tokens["web", "member"], tokens["llm", "member"]
    assert client.post("/v1/projects/web/clusters", headers=web, json={"name": "low", "gpus": 2}).json()["state"] == "ready"
    steps = 60  # enough that it is still running when preempted
    config = tiny_config(library_corpus, steps)
    config["train"]["checkpoint_every"] = 1000  # no periodic checkpoint: only the one taken when it is stopped
    r = client.post("/v1/projects/web/jobs", headers=web, json={"cluster": "low", "config": config, "max_restarts": 0})
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    deadline = time.monotonic() + 240
    while len(client.get(f"/v1/projects/web/jobs/{jid}/metrics", headers=web).json()["steps"]) < 3:
        assert time.monotonic() < deadline and client.get(f"/v1/projects/web/jobs/{jid}", headers=web).json()["state"] == "running"
        time.sleep(0.2)

    r = client.put("/v1/projects/llm/quota", headers=tokens["op"], json={"gpu_type": "local", "max_priority": 5})
    assert r.status_code == 200, r.text  # the operator grants llm a higher priority
    urgent = client.post("/v1/projects/llm/clusters", headers=llm, json={"name": "urgent", "gpus": 2, "priority": 5}).json()
    assert urgent["state"] == "ready", urgent
    # the fleet stopped the job (SIGTERM: it checkpoints the step it is in) and put it back to pending
    job = client.get(f"/v1/projects/web/jobs/{jid}", headers=web).json()
    assert job["state"] == "pending" and job["preemptions"] == 1 and job["detail"].startswith("preempted by cluster 'llm/urgent'"), job
    low = client.get("/v1/projects/web/clusters/low", headers=web).json()
    assert low["state"] == "queued" and low["reason"].startswith("preempted by cluster 'llm/urgent' (priority 5")
    stopped_at = max(m["step"] for m in client.get(f"/v1/projects/web/jobs/{jid}/metrics", headers=web).json()["steps"] if "loss" in m)

    assert client.delete("/v1/projects/llm/clusters/urgent", headers=llm).status_code == 200
    assert client.get("/v1/projects/web/clusters/low", headers=web).json()["state"] == "ready"
    r = client.get(f"/v1/projects/web/jobs/{jid}/logs?follow=true&timeout_s=300", headers=web)
    final = client.get(f"/v1/projects/web/jobs/{jid}", headers=web).json()
    assert final["state"] == "completed", r.text[-3000:]
    # the same job ran on and redid no step, though no periodic checkpoint was ever taken
    logged = [m["step"] for m in client.get(f"/v1/projects/web/jobs/{jid}/metrics", headers=web).json()["steps"] if "loss" in m]
    # the step it was in when stopped was finished and checkpointed: the restart begins right after it
    assert logged == list(range(1, steps + 1)) and 3 <= stopped_at < steps, (stopped_at, logged)
    assert client.delete("/v1/projects/web/clusters/low", headers=web).status_code == 200


def test_log_followers_wait_without_holding_the_servers_threads(tmp_path):
    """30 clients following a running job's log: the server's worker threads stay free (a follower
    waits on the event loop), so every other request still gets one; 45 followers once held them all."""
    import asyncio
    import sys
    import threading

    import httpx
    import sqlalchemy as sa
    import uvicorn

    from supercluster.cluster import jobs as fleet_jobs
    from supercluster.service.models import Project, ServiceJob

    store = Store(f"sqlite:///{tmp_path / 'service.db'}")
    with store.session() as s:
        op = {"Authorization": f"Bearer {tenancy.init_operator(s)}"}
    init_fleet(store.fleet, "local", gpus=2)
    server = uvicorn.Server(uvicorn.Config(create_app(store=store), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    with httpx.Client(base_url=base, timeout=60) as c:
        c.post("/v1/orgs", headers=op, json={"name": "acme"}).raise_for_status()
        c.post("/v1/orgs/acme/projects", headers=op, json={"name": "llm"}).raise_for_status()
        c.post("/v1/users", headers=op, json={"name": "m", "org": "acme"}).raise_for_status()
        h = {"Authorization": f"Bearer {c.post('/v1/tokens', headers=op, json={'user': 'm', 'project': 'llm', 'role': 'member'}).json()['token']}"}
        assert c.post("/v1/projects/llm/clusters", headers=h, json={"name": "c", "gpus": 1}).json()["state"] == "ready"
    with store.session() as s:
        project = s.scalar(sa.select(Project).where(Project.name == "llm"))
    config = tmp_path / "job.toml"
    config.write_text("")
    job = fleet_jobs.submit_job(store.fleet, f"p{project.id}.c", str(config), max_restarts=0,
                                command=[sys.executable, "-c", "import time; time.sleep(120)"])
    with store.session() as s:
        s.add(ServiceJob(job_id=job["id"], project_id=project.id, user_id=1, cluster="c", created_at=time.time()))

    async def follow_many(n: int) -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            streams = [client.stream("GET", f"/v1/projects/llm/jobs/{job['id']}/logs?follow=true&timeout_s=60", headers=h)
                       for _ in range(n)]
            responses = [await stream.__aenter__() for stream in streams]
            assert all(r.status_code == 200 for r in responses)
            await asyncio.sleep(3)  # several polls of every follower
            busy = threading.active_count()
            whoami = await client.get("/v1/whoami", headers=h)
            for stream in streams:
                await stream.__aexit__(None, None, None)
            return busy, whoami.status_code

    try:
        idle = threading.active_count()
        busy, whoami = asyncio.run(follow_many(30))
        assert whoami == 200
        assert busy - idle < 12, f"{busy - idle} threads busy for 30 followers"  # one each, before
    finally:
        fleet_jobs.cancel_job(store.fleet, job["id"])
        server.should_exit = True
        thread.join(timeout=30)
        store.dispose()
