"""Endpoints: the fleet trains a model and serves it. A tiny training job of a project, then its
run served from the project's cluster; the official `openai` client (sync and streaming) calls it
through the service with the project's token, another tenant cannot, usage counts the tokens, and
deleting the endpoint stops its server."""

import contextlib
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa


from test_service_cli import run
from test_service_jobs import tiny_config


@pytest.fixture
def live(live_service):
    base, tokens, grant = live_service
    for org, project in (("acme", "llm"), ("globex", "web")):
        for role in ("member", "viewer"):
            grant(org, project, role)
    with httpx.Client(base_url=base, timeout=120) as client:
        yield client, tokens


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def wait_for(client, path: str, headers: dict, done, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while not done(body := client.get(path, headers=headers).json()):
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    return body


@pytest.mark.slow
def test_a_trained_run_is_served_through_the_service(live, library_corpus, tmp_path, capsys):
    client, tokens = live
    member, viewer, other = (bearer(tokens[k]) for k in (("llm", "member"), ("llm", "viewer"), ("web", "member")))
    assert client.post("/v1/projects/llm/clusters", headers=member, json={"name": "here", "gpus": 2}).json()["state"] == "ready"
    jid = client.post("/v1/projects/llm/jobs", headers=member,
                      json={"cluster": "here", "config": tiny_config(library_corpus, 4), "max_restarts": 0}).json()["id"]
    assert wait_for(client, f"/v1/projects/llm/jobs/{jid}", member, lambda j: j["state"] not in ("pending", "running"))["state"] == "completed"

    # what may be served: this project's runs and the model library, nothing else
    body = {"name": "chat", "cluster": "here", "job": jid}
    assert client.post("/v1/projects/web/endpoints", headers=other, json={**body, "cluster": "here"}).status_code == 404
    r = client.post("/v1/projects/llm/endpoints", headers=member, json={"name": "x", "cluster": "here", "run_dir": str(tmp_path)})
    assert r.status_code == 403 and "model library" in r.json()["detail"]
    assert client.post("/v1/projects/llm/endpoints", headers=member, json={**body, "run_dir": "a"}).status_code == 422
    assert client.post("/v1/projects/llm/endpoints", headers=viewer, json=body).status_code == 403

    r = client.post("/v1/projects/llm/endpoints", headers=member, json=body)
    assert r.status_code == 202 and r.json()["state"] == "starting", r.text
    assert client.post("/v1/projects/llm/endpoints", headers=member, json=body).status_code == 409  # the name is taken
    ready = wait_for(client, "/v1/projects/llm/endpoints/chat", viewer, lambda e: e["state"] != "starting")
    assert ready["state"] == "ready", ready
    assert "secret" not in ready and "url" not in ready
    # the server's key is in a file of the service's: neither on any command line nor in the fleet's books
    with sa.create_engine(f"sqlite:///{tmp_path / 'service.db'}").connect() as conn:
        secret, url = conn.execute(sa.text("SELECT secret, url FROM svc_endpoints WHERE name = 'chat'")).one()
        commands = conn.execute(sa.text("SELECT command FROM jobs")).scalars().all()
    assert len(commands) == 2 and not any(secret in str(c) for c in commands)
    cmdlines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            cmdlines.append(path.read_bytes())
    assert any(b"--api-key-file" in c for c in cmdlines) and not any(secret.encode() in c for c in cmdlines)
    server = str(client.base_url)  # the CLI, as the server's client
    assert run(capsys, "login", "--server", server, "--token", tokens["llm", "member"])[0] == 0
    code, out, _ = run(capsys, "endpoint", "list", "--server", server, "--json")
    assert code == 0 and [e["name"] for e in json.loads(out)] == ["chat"]

    base = f"{client.base_url}{ready['base_url']}"
    oai = openai.OpenAI(base_url=base, api_key=tokens["llm", "member"], max_retries=0)
    (model,) = [m.id for m in oai.models.list()]
    assert model == "chat"  # served under the endpoint's name, not its run directory's
    whole = oai.completions.create(model=model, prompt="def parse(self, text):", max_tokens=6, temperature=0)
    assert whole.usage.completion_tokens == 6 and whole.choices[0].text
    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "import os"}],
                                              max_tokens=5, temperature=0, stream=True))
    assert all(c.choices for c in chunks)  # the usage chunk the service asked for is not passed on unasked
    streamed = list(oai.completions.create(model=model, prompt="def parse(self, text):", max_tokens=6, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    assert streamed[-1].usage.completion_tokens == 6

    # other tenants and viewers cannot call it; a bad key is a 401; all in OpenAI's error body
    r = httpx.post(f"{base}/completions", json={"model": model, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["message"] and r.headers["www-authenticate"] == "Bearer"
    for token, status in ((tokens["web", "member"], 404), (tokens["llm", "viewer"], 403), ("sc_nope", 401)):
        denied = openai.OpenAI(base_url=base, api_key=token, max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            denied.completions.create(model=model, prompt="x", max_tokens=2)
        assert err.value.status_code == status
        assert "does not answer" not in str(err.value)

    # three answered calls, 6 + 5 + 6 completion tokens, in the endpoint and in usage; no audit rows for them
    shown = client.get("/v1/projects/llm/endpoints/chat", headers=viewer).json()
    assert (shown["requests"], shown["completion_tokens"]) == (3, 17) and shown["prompt_tokens"] > 0
    (row,) = client.get("/v1/usage", headers=member).json()["tokens"]
    assert row["project"] == "llm" and row["endpoint"] == "chat" and (row["requests"], row["completion_tokens"]) == (3, 17)
    by_user = client.get("/v1/usage?by=user", headers=member).json()["tokens"]
    assert [r["user"] for r in by_user] == ["llm-member"]
    assert client.get("/v1/usage", headers=other).json()["tokens"] == []
    code, out, _ = run(capsys, "usage", "--server", server, "--json")
    assert code == 0 and json.loads(out)["tokens"][0]["completion_tokens"] == 17
    audit = client.get("/v1/audit?limit=1000", headers=bearer(tokens["op"])).json()
    assert any(a["path"] == "/v1/projects/llm/endpoints" and a["status"] == 202 for a in audit)
    assert not any("/endpoints/chat/v1/" in a["path"] for a in audit)

    # deleting stops the server: the endpoint says stopped, the fleet job is cancelled, calls get 503
    assert httpx.get(f"{url}/health").status_code == 200
    stopped = client.delete("/v1/projects/llm/endpoints/chat", headers=member).json()
    assert stopped["state"] == "stopped" and stopped["requests"] == 3
    with pytest.raises(httpx.TransportError):  # the delete answered once the server was gone
        httpx.get(f"{url}/health", timeout=5)
    assert not list((Path(os.environ["SUPERCLUSTER_HOME"]) / "service" / "endpoint-keys").iterdir())
    job = client.get(f"/v1/projects/llm/jobs/{jid}", headers=member).json()
    assert job["state"] == "completed"  # the training job is untouched
    with pytest.raises(openai.APIStatusError) as err:
        oai.completions.create(model=model, prompt="x", max_tokens=2)
    assert err.value.status_code == 503 and "stopped" in err.value.message
    assert client.delete("/v1/projects/llm/clusters/here", headers=member).status_code == 200


def test_endpoint_requests_are_checked_before_anything_starts(live, tmp_path):
    client, tokens = live
    member = bearer(tokens["llm", "member"])
    r = client.post("/v1/projects/llm/endpoints", headers=member, json={"name": "e", "cluster": "none", "run_dir": "m"})
    assert r.status_code == 404 and "no cluster named 'none'" in r.json()["detail"]
    client.post("/v1/projects/llm/clusters", headers=member, json={"name": "here", "gpus": 2}).raise_for_status()
    for body, status, words in (
        ({"name": "e", "cluster": "here"}, 422, "exactly one of run_dir and job"),
        ({"name": "e", "cluster": "here", "job": 999}, 404, "no job 999"),
        ({"name": "e", "cluster": "here", "run_dir": "../../etc"}, 403, "model library"),
        ({"name": "e", "cluster": "here", "run_dir": "missing"}, 422, "no config.toml"),
        ({"name": "e", "cluster": "here", "run_dir": "m", "quantize": "int3"}, 422, "quantize"),
        ({"name": "e", "cluster": "here", "run_dir": "m", "extra": 1}, 422, "extra"),
    ):
        r = client.post("/v1/projects/llm/endpoints", headers=member, json=body)
        assert r.status_code == status and words in r.json()["detail"], (body, r.text)
    assert client.get("/v1/projects/llm/endpoints", headers=member).json() == []
    assert client.get("/v1/projects/llm/endpoints/e", headers=member).status_code == 404
    r = client.post("/v1/projects/llm/endpoints/e/v1/completions", headers=member, json={"prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Project 'llm' has no endpoint")
    r = client.get("/v1/projects/llm/endpoints/e/v1/embeddings", headers=member)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
