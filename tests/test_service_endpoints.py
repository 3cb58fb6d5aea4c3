"""Endpoints: the fleet trains a model and serves it. A tiny training job of a project, then its
run served from the project's cluster; the official `openai` client (sync and streaming) calls it
through the service with the project's token, another tenant cannot, usage counts the tokens, and
deleting the endpoint stops its server."""

import contextlib
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa

from supercluster.service import replicas
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
        secret = conn.execute(sa.text("SELECT secret FROM svc_endpoints WHERE name = 'chat'")).scalar_one()
        url = conn.execute(sa.text("SELECT url FROM svc_endpoint_replicas")).scalar_one()
        commands = conn.execute(sa.text("SELECT command FROM jobs")).scalars().all()
    assert len(commands) == 2 and not any(secret in str(c) for c in commands)
    assert replicas.key_file(secret).is_file()
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

    # bad input is the model server's 400 naming the field, passed on (and not counted), never a 500
    with pytest.raises(openai.BadRequestError, match="'seed'"):
        oai.completions.create(model=model, prompt="x", max_tokens=2, seed=2**64)
    with pytest.raises(openai.BadRequestError, match="'messages.0.content.0.text'"):
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}],
                                    max_tokens=2, stream=True)

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

    # deleting stops the server: answered at once (202, stopping: calls get 503 from now on), then
    # stopped once the server no longer answers; the fleet job is cancelled
    assert httpx.get(f"{url}/health").status_code == 200
    r = client.delete("/v1/projects/llm/endpoints/chat", headers=member)
    assert r.status_code == 202 and r.json()["state"] in ("stopping", "stopped") and r.json()["requests"] == 3
    code, out, _ = run(capsys, "endpoint", "delete", "chat", "--server", server, "--json")  # the CLI waits by polling
    assert code == 0 and json.loads(out)["state"] == "stopped"
    stopped = client.get("/v1/projects/llm/endpoints/chat", headers=member).json()
    assert stopped["state"] == "stopped" and stopped["requests"] == 3
    with pytest.raises(httpx.TransportError):  # stopped only once the server was gone
        httpx.get(f"{url}/health", timeout=5)
    # its key file is gone (other modules' endpoints, under xdist in the same home, may keep theirs)
    assert not replicas.key_file(secret).exists()
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


class DyingModelServer:
    """A stand-in model server on loopback, for the peer failures a real one is slow to stage:
    prompt "die" sends two stream chunks (or half a body) and drops the connection; "hang" sends
    two chunks (or nothing) and waits until the service closes the call; "ok" streams two chunks
    and ends as a stream ends. Chunks carry the usage
    so far, as `supercluster serve` sends it when asked for `continuous_usage_stats`."""

    def __init__(self):
        import socketserver
        import threading

        self.bodies, self.closed = [], threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                outer.answer(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, sock):
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(65536)
        payload = json.loads(body)
        self.bodies.append(payload)
        if payload.get("stream"):
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for n in (1, 2):
                chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "text": f"t{n}", "logprobs": None, "finish_reason": None}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}}
                event = f"data: {json.dumps(chunk)}\n\n".encode()
                sock.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            if payload["prompt"] == "ok":  # the usage chunk, [DONE] and the end of the body
                final = {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
                for event in (f"data: {json.dumps(final)}\n\n".encode(), b"data: [DONE]\n\n"):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                sock.sendall(b"0\r\n\r\n")
        elif payload["prompt"] == "die":
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"id\":")
        if payload["prompt"] == "hang":
            sock.settimeout(60)
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
            self.closed.set()
        sock.close()  # "die": no end of the chunked body, as when a server is killed


@pytest.fixture
def dying(live, tmp_path):
    """An endpoint `flaky` of project llm, ready, whose server is a DyingModelServer."""
    client, tokens = live
    stand_in = DyingModelServer()
    with sa.create_engine(f"sqlite:///{tmp_path / 'service.db'}").begin() as conn:
        project = conn.execute(sa.text("SELECT id FROM svc_projects WHERE name = 'llm'")).scalar_one()
        user = conn.execute(sa.text("SELECT id FROM svc_users WHERE name = 'llm-member'")).scalar_one()
        conn.execute(sa.text("INSERT INTO svc_endpoints (project_id, user_id, name, cluster, run_dir, secret, state, "
                             "created_at) VALUES (:p, :u, 'flaky', 'here', '/nowhere', 's', 'ready', 0)"),
                     {"p": project, "u": user})
        conn.execute(sa.text("INSERT INTO svc_endpoint_replicas (endpoint_id, \"index\", url, port, state, started_at) "
                             "SELECT id, 0, :url, 0, 'ready', 0 FROM svc_endpoints WHERE name = 'flaky'"), {"url": stand_in.url})
    yield client, tokens, stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


def token_usage(client, tokens) -> tuple:
    rows = client.get("/v1/usage", headers=bearer(tokens["llm", "member"])).json()["tokens"]
    return tuple((r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows)


def test_a_stream_whose_server_dies_ends_with_an_error_and_counts_what_it_relayed(dying):
    client, tokens, stand_in = dying
    base = f"{client.base_url}/v1/projects/llm/endpoints/flaky/v1"
    with httpx.stream("POST", f"{base}/completions", headers=bearer(tokens["llm", "member"]), timeout=60,
                      json={"model": "m", "prompt": "die", "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert stand_in.bodies[-1]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:2]] == ["t1", "t2"]
    assert all("usage" not in json.loads(e[6:]) for e in events[:2])  # the client did not ask for it
    error = json.loads(events[2][6:])["error"]
    assert "'flaky' stopped answering mid-stream" in error["message"] and error["type"] == "server_error"
    assert events[3:] == ["data: [DONE]"]
    assert token_usage(client, tokens) == ((1, 3, 2),)
    # the official client raises it as an API error, after the tokens it got
    oai = openai.OpenAI(base_url=base, api_key=tokens["llm", "member"], max_retries=0)
    texts = []
    with pytest.raises(openai.APIError, match="stopped answering mid-stream"):
        for chunk in oai.completions.create(model="m", prompt="die", stream=True):
            texts.append(chunk.choices[0].text)
    assert texts == ["t1", "t2"] and token_usage(client, tokens) == ((2, 6, 4),)


def test_a_caller_that_leaves_early_is_counted_and_closes_the_call_to_the_server(dying):
    client, tokens, stand_in = dying
    base = f"{client.base_url}/v1/projects/llm/endpoints/flaky/v1"
    with httpx.stream("POST", f"{base}/completions", headers=bearer(tokens["llm", "member"]), timeout=60,
                      json={"model": "m", "prompt": "hang", "stream": True,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
        lines = r.iter_lines()
        first, second = (json.loads(next(line for line in lines if line)[6:]) for _ in range(2))
    assert (first["usage"]["completion_tokens"], second["usage"]["completion_tokens"]) == (1, 2)  # asked for: passed on
    assert stand_in.closed.wait(30)  # the service hung up on the server too
    for _ in range(100):  # recorded as the relay ends, just after the caller left
        if token_usage(client, tokens):
            break
        time.sleep(0.05)
    assert token_usage(client, tokens) == ((1, 3, 2),)

    # a caller of a whole answer that leaves: the call to the server is closed (it stops generating
    # there), and the caller is charged for the tokens generated until then (asked as a stream)
    stand_in.closed.clear()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/completions", headers=bearer(tokens["llm", "member"]), timeout=0.5,
                   json={"model": "m", "prompt": "hang"})
    assert stand_in.closed.wait(30)
    assert stand_in.bodies[-1]["stream"] is True
    for _ in range(100):
        if token_usage(client, tokens) != ((1, 3, 2),):
            break
        time.sleep(0.05)
    assert token_usage(client, tokens) == ((2, 6, 4),)


def test_a_whole_answer_is_rebuilt_from_the_stream_the_service_asks_for(dying):
    client, tokens, stand_in = dying
    r = client.post("/v1/projects/llm/endpoints/flaky/v1/completions", headers=bearer(tokens["llm", "member"]),
                    json={"model": "m", "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert stand_in.bodies[-1]["stream"] is True and stand_in.bodies[-1]["max_tokens"] == 2
    assert r.json() == {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                        "choices": [{"index": 0, "text": "t1t2", "logprobs": None, "finish_reason": None}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert token_usage(client, tokens) == ((1, 3, 2),)


def test_a_whole_answer_whose_server_dies_is_a_502(dying):
    client, tokens, _ = dying
    r = client.post("/v1/projects/llm/endpoints/flaky/v1/completions", headers=bearer(tokens["llm", "member"]),
                    json={"model": "m", "prompt": "die"})
    assert r.status_code == 502 and "'flaky' failed mid-answer" in r.json()["error"]["message"]
    assert token_usage(client, tokens) == ()


SLOW_TO_STOP = """
import http.server, os, signal, sys, threading
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
# as a model server finishing its running requests: still answering for a while after SIGTERM
signal.signal(signal.SIGTERM, lambda *_: threading.Timer(2.0, os._exit, (0,)).start())
server.serve_forever()
"""


def test_deleting_an_endpoint_answers_at_once_and_it_is_stopped_once_its_server_is_gone(live, tmp_path, capsys):
    import sys

    from supercluster.cluster import jobs as fleet_jobs
    from supercluster.service.replicas import free_port

    client, tokens = live
    member = bearer(tokens["llm", "member"])
    client.post("/v1/projects/llm/clusters", headers=member, json={"name": "here", "gpus": 1}).raise_for_status()
    db = f"sqlite:///{tmp_path / 'service.db'}"
    port = free_port()
    with sa.create_engine(db).connect() as conn:
        fleet_cluster = conn.execute(sa.text("SELECT fleet_name FROM svc_clusters WHERE name = 'here'")).scalar_one()
    job = fleet_jobs.submit_job(db, fleet_cluster, "/nowhere", command=[sys.executable, "-c", SLOW_TO_STOP, str(port)],
                                max_restarts=0)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=1)
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with sa.create_engine(db).begin() as conn:
        conn.execute(sa.text("INSERT INTO svc_endpoints (project_id, user_id, name, cluster, run_dir, secret, state, "
                             "created_at) SELECT p.id, u.id, 'slow', 'here', '/nowhere', 's', 'ready', 0 "
                             "FROM svc_projects p, svc_users u WHERE p.name = 'llm' AND u.name = 'llm-member'"))
        conn.execute(sa.text("INSERT INTO svc_endpoint_replicas (endpoint_id, \"index\", job_id, url, port, state, started_at) "
                             "SELECT id, 0, :job, :url, :port, 'ready', 0 FROM svc_endpoints WHERE name = 'slow'"),
                     {"job": job["id"], "url": url, "port": port})

    r = client.delete("/v1/projects/llm/endpoints/slow", headers=member)
    assert r.status_code == 202 and r.json()["state"] == "stopping", r.text
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # answered while its server still runs
    r = client.post("/v1/projects/llm/endpoints/slow/v1/completions", headers=member, json={"prompt": "x"})
    assert r.status_code == 503 and "is stopping" in r.json()["error"]["message"]  # nothing relayed to it any more
    r = client.post("/v1/projects/llm/endpoints", headers=member, json={"name": "slow", "cluster": "here", "run_dir": "m"})
    assert r.status_code == 409 and "wait until it is stopped" in r.json()["detail"]  # its name is still taken
    server = str(client.base_url)
    assert run(capsys, "login", "--server", server, "--token", tokens["llm", "member"])[0] == 0
    code, out, _ = run(capsys, "endpoint", "delete", "slow", "--no-wait", "--server", server)
    assert code == 0 and out.startswith("endpoint slow st")  # stopping, or stopped by now
    code, out, _ = run(capsys, "endpoint", "delete", "slow", "--server", server)  # waits, polling
    assert code == 0 and out == "endpoint slow stopped after 0 requests\n"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)
