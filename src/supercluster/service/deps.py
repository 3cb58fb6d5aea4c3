"""What every route depends on: the caller the gate authenticated."""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from supercluster.service.auth import Caller

_bearer = HTTPBearer(auto_error=False, description="An API token from `supercluster server init` or POST /v1/tokens.")


async def caller(request: Request, _creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Caller:
    # async: it only reads what the gate set, and FastAPI runs a plain function dependency in its
    # thread pool, a trip there and back on every call before the route's own.
    return request.state.caller  # set by the gate (declared as a dependency so OpenAPI shows the Bearer scheme)
