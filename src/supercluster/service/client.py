"""The CLI's side of the service: where the server is, the stored token, and one JSON call.

`supercluster login` keeps {server, token} in `$SUPERCLUSTER_HOME/service.json`, readable by its
owner only (0600), so a token never has to sit in the shell history or the environment.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

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


def server_url(flag: str | None) -> str | None:
    """--server, else $SUPERCLUSTER_SERVER, else the server of the last login, else None (local database)."""
    return flag or os.environ.get("SUPERCLUSTER_SERVER") or None


def call(server: str, method: str, path: str, *, token: str | None = None, body: dict | None = None,
         query: dict | None = None, raw: bool = False):
    """One request; a non-2xx answer becomes a UserError carrying the server's sentence."""
    token = token or load_login().get("token")
    if not token:
        raise UserError("No token for the server; run `supercluster login --server URL` first.")
    url = server.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}",
                                                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read().decode()).get("detail")
        except ValueError:
            detail = err.reason
        raise UserError(f"The server answered {err.code}: {detail}") from None
    except urllib.error.URLError as err:
        raise UserError(f"Cannot reach the server at {server} ({err.reason}); check --server or $SUPERCLUSTER_SERVER.") from None
    return text if raw else json.loads(text)
