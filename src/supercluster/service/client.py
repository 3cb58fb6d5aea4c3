"""The CLI's side of the service: where the server is, the stored token, one JSON call, a stream
of server-sent events, and a project's cluster and job routes (`ProjectClient`).

`supercluster login` keeps {server, token} in `$SUPERCLUSTER_HOME/service.json`, readable by its
owner only (0600), so a token never has to sit in the shell history or the environment.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from supercluster.errors import UserError


def credentials_path() -> Path:
    from supercluster.hardware.local import home

    return home() / "service.json"


def save_login(server: str, token: str) -> Path:
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        json.dump({"server": server.rstrip("/"), "token": token}, f)
    os.replace(tmp, path)
    return path


def load_login() -> dict:
    try:
        return json.loads(credentials_path().read_text())
    except FileNotFoundError:
        return {}


def checked_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host; else one sentence saying how to write one."""
    try:
        parsed = urllib.parse.urlsplit(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and (parsed.port or 0) >= 0
    except ValueError:  # a malformed host or port
        ok = False
    if not ok:
        raise UserError(f"The server {url!r} is not a URL; write it like http://127.0.0.1:8765 (--server or $SUPERCLUSTER_SERVER).")
    return url


def server_url(flag: str | None) -> str | None:
    """--server, else $SUPERCLUSTER_SERVER, else None: the local database. A login alone never
    sends commands to a server, so one that worked on the local database keeps doing so."""
    url = flag or os.environ.get("SUPERCLUSTER_SERVER") or None
    return checked_url(url) if url else None


def _token_for(server: str) -> str:
    saved = load_login()
    # the stored token goes only to the server it was issued for, never to another --server
    if saved.get("token") and saved.get("server") == server.rstrip("/"):
        return saved["token"]
    raise UserError(f"No token for {server}; run `supercluster login --server {server}` first.")


def _open(server: str, method: str, path: str, *, token: str | None = None, body: dict | None = None,
          query: dict | None = None, timeout: float = 60.0):
    """The open response of one request; a non-2xx answer becomes a UserError carrying the server's sentence."""
    token = token or _token_for(server)
    url = server.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}",
                                                                          "Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read().decode()).get("detail")
        except ValueError:
            detail = err.reason
        raise UserError(f"The server answered {err.code}: {detail}") from None
    except urllib.error.URLError as err:
        raise UserError(f"Cannot reach the server at {server} ({err.reason}); check --server or $SUPERCLUSTER_SERVER.") from None
    except TimeoutError:
        raise UserError(f"The server at {server} did not answer within {timeout:g} s; try again.") from None


def call(server: str, method: str, path: str, *, token: str | None = None, body: dict | None = None,
         query: dict | None = None, raw: bool = False):
    """One request and its JSON answer (its text with `raw`)."""
    with _open(server, method, path, token=token, body=body, query=query) as resp:
        text = resp.read().decode()
    return text if raw else json.loads(text)


def events(server: str, path: str, query: dict | None = None, read_timeout: float = 60.0) -> Iterator[tuple[str, str]]:
    """The server-sent events of one GET as (event, data), `message` being the unnamed kind."""
    with _open(server, "GET", path, query=query, timeout=read_timeout) as resp:
        kind, data = "message", []
        for raw in resp:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if not line:  # a blank line ends an event
                if data:
                    yield kind, "\n".join(data)
                kind, data = "message", []
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))


ACTIVE = ("pending", "running")


class ProjectClient:
    """One project's clusters and jobs on a server: a method per route, answers as the server gives them."""

    def __init__(self, server: str, project: str | None = None):
        self.server = server.rstrip("/")
        self._project = project

    @property
    def project(self) -> str:
        """The project named, else the one the stored token is scoped to."""
        if self._project is None:
            self._project = call(self.server, "GET", "/v1/whoami").get("project")
            if not self._project:
                raise UserError("This token is scoped to no project (the operator's); pass --project NAME or set $SUPERCLUSTER_PROJECT.")
        return self._project

    def _path(self, *parts) -> str:
        return "/".join(["/v1/projects", *(urllib.parse.quote(str(p), safe="") for p in (self.project, *parts))])

    def _call(self, method: str, *parts, **kw):
        return call(self.server, method, self._path(*parts), **kw)

    def create_cluster(self, name: str, gpus: int, **options) -> dict:
        return self._call("POST", "clusters", body={"name": name, "gpus": gpus, **options})

    def list_clusters(self) -> list[dict]:
        return self._call("GET", "clusters")

    def show_cluster(self, name: str) -> dict:
        return self._call("GET", "clusters", name)

    def delete_cluster(self, name: str, force: bool = False) -> dict:
        return self._call("DELETE", "clusters", name, query={"force": "true" if force else None})

    def submit_job(self, cluster: str, config: dict, overrides: list[str], max_restarts: int) -> dict:
        return self._call("POST", "jobs", body={"cluster": cluster, "config": config, "overrides": overrides,
                                                 "max_restarts": max_restarts})

    def list_jobs(self) -> list[dict]:
        return self._call("GET", "jobs")

    def job_status(self, job_id: int) -> dict:
        return self._call("GET", "jobs", job_id)

    def wait_job(self, job_id: int, poll_s: float = 2.0) -> dict:
        while (job := self.job_status(job_id))["state"] in ACTIVE:
            time.sleep(poll_s)
        return job

    def cancel_job(self, job_id: int) -> dict:
        return self._call("DELETE", "jobs", job_id)

    def set_quota(self, gpu_type: str, **limits) -> dict:
        return self._call("PUT", "quota", body={"gpu_type": gpu_type, **limits})

    def deploy_endpoint(self, name: str, cluster: str, **source) -> dict:
        return self._call("POST", "endpoints", body={"name": name, "cluster": cluster, **source})

    def list_endpoints(self) -> list[dict]:
        return self._call("GET", "endpoints")

    def show_endpoint(self, name: str) -> dict:
        return self._call("GET", "endpoints", name)

    def wait_endpoint(self, name: str, poll_s: float = 1.0, leaving: str = "starting",
                      timeout_s: float | None = None) -> dict:
        """Polls until the endpoint's state is no longer `leaving` (UserError past `timeout_s`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (endpoint := self.show_endpoint(name))["state"] == leaving:
            if deadline is not None and time.monotonic() > deadline:
                raise UserError(f"Endpoint {name!r} is still {leaving} after {timeout_s:.0f} s; see "
                                f"`supercluster endpoint show {name}` and its job's log.")
            time.sleep(poll_s)
        return endpoint

    def delete_endpoint(self, name: str) -> dict:
        return self._call("DELETE", "endpoints", name)

    def job_logs(self, job_id: int, follow: bool = False) -> Iterator[str]:
        """The job's log lines; with `follow`, until the job ends. A stream the server or a quiet
        socket closes while the job runs is opened again, past the lines already given."""
        path, seen = self._path("jobs", job_id, "logs"), 0
        while True:
            state, count = None, 0
            try:
                for kind, data in events(self.server, path, {"follow": "true" if follow else None, "timeout_s": 3600}):
                    if kind == "end":
                        state = json.loads(data).get("state")
                    else:
                        count += 1
                        if count > seen:
                            seen = count
                            yield data
            except TimeoutError:  # no line for a while from a quiet job: ask again
                pass
            if not follow or (state is not None and state not in ACTIVE):
                return
