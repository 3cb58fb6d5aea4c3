"""The gate every /v1 call passes first: who calls (a bearer token, checked before anything reads
the request, so a malformed body from a caller without a valid token gets 401, not a parse
error), how often (per token; and per address for unknown tokens), and, once answered, the audit
row of a call that changes something.

A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` runs the app in a task of its own and
streams its answer through a memory channel, a cost paid on every call for nothing the gate needs.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from supercluster.service.audit import AuditLog
from supercluster.service.auth import Caller, CallerCache, RateLimiter, ServiceError, authenticate_hash, bearer_hash
from supercluster.service.models import Audit
from supercluster.service.relay import openai_error
from supercluster.service.store import Store

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
# Calls to a model through an endpoint change nothing: they are counted for usage, not audited.
MODEL_CALL = re.compile(r"^/v1/projects/[^/]+/endpoints/[^/]+/v1/")


class Gate:
    """The app's middleware: `app.add_middleware(Gate(store, rate, burst, audit))`."""

    def __init__(self, store: Store, rate: float, burst: int, audit: AuditLog):
        self.store, self.audit = store, audit
        self.limiter = RateLimiter(rate, burst)
        self.guesses = RateLimiter(rate=1.0, burst=20, what="unknown tokens from this address")  # per client address
        self.callers = CallerCache()

    def __call__(self, app):
        """The ASGI app `app` behind this gate (what Starlette's `add_middleware` asks of a middleware)."""
        return functools.partial(self._serve, app)

    async def _serve(self, app, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        model_call = MODEL_CALL.match(path) is not None
        caller = None
        if method in MUTATING and not model_call:
            send = self._audited(scope, send, lambda: caller)
        try:
            if path.startswith("/v1/"):
                caller = await self._authenticate(Request(scope))
                scope.setdefault("state", {})["caller"] = caller  # what `deps.caller` gives the routes
                self.limiter.check(caller.token_id)
        except ServiceError as err:
            if model_call:  # a bad token or too many calls, told as OpenAI's clients expect
                response = openai_error(err.status, err.message, err.headers)
            else:
                response = JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)
            return await response(scope, receive, send)
        await app(scope, receive, send)

    def _audited(self, scope, send, caller):
        """`send`, holding the answer back until the call's audit row is committed: an answered call is in the log."""
        async def send_after_audit(message) -> None:
            if message["type"] == "http.response.start":
                who: Caller | None = caller()
                client = scope.get("client")
                row = Audit(at=time.time(), user_id=who.user_id if who else None, token_id=who.token_id if who else None,
                            project_id=who.project_id if who else None, method=scope["method"], path=scope["path"][:1000],
                            status=message["status"], client=client[0] if client else None)
                await asyncio.wrap_future(self.audit.record(row))
            await send(message)

        return send_after_audit

    async def _authenticate(self, request: Request) -> Caller:
        query = request.scope.get("query_string")
        if "\x00" in request.scope["path"] or (query and any("\x00" in v for v in request.query_params.values())):
            raise ServiceError(422, "Names and query values cannot contain NUL characters.")
        token_hash = bearer_hash(request.headers.get("authorization"))
        caller = self.callers.get(token_hash)
        if caller is not None:
            return caller
        # Unknown tokens cost a database read each: an address that keeps sending them is held
        # back as a token that calls too often is (429), before the read.
        address = request.client.host if request.client else "?"
        self.guesses.check(address, spend=False)
        try:
            return await run_in_threadpool(_look_up, self.store, self.callers, token_hash)
        except ServiceError as err:
            if err.status == 401:
                self.guesses.check(address)
            raise


def _look_up(store: Store, callers: CallerCache, token_hash: str) -> Caller:
    generation = callers.generation
    with store.reading() as s:
        caller, expires_at = authenticate_hash(s, token_hash)
    callers.put(token_hash, caller, expires_at, generation)
    return caller
