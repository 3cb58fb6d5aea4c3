"""The gate every /v1 call passes first: who calls (a bearer token, checked before anything reads
the request, so a malformed body from a caller without a valid token gets 401, not a parse
error), how often (per token; and per address for unknown tokens), and, once answered, the audit
row of a call that changes something."""

from __future__ import annotations

import re
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from supercluster.service.auth import Caller, CallerCache, RateLimiter, ServiceError, authenticate_hash, bearer_hash
from supercluster.service.models import Audit
from supercluster.service.relay import openai_error
from supercluster.service.store import Store

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
# Calls to a model through an endpoint change nothing: they are counted for usage, not audited.
MODEL_CALL = re.compile(r"^/v1/projects/[^/]+/endpoints/[^/]+/v1/")


class Gate:
    """The app's HTTP middleware: `app.middleware("http")(Gate(store, rate, burst))`."""

    def __init__(self, store: Store, rate: float, burst: int):
        self.store = store
        self.limiter = RateLimiter(rate, burst)
        self.guesses = RateLimiter(rate=1.0, burst=20, what="unknown tokens from this address")  # per client address
        self.callers = CallerCache()

    async def __call__(self, request: Request, call_next):
        caller = None
        try:
            if request.url.path.startswith("/v1/"):
                caller = await self._authenticate(request)
                request.state.caller = caller
                self.limiter.check(caller.token_id)
            response = await call_next(request)
        except ServiceError as err:
            if MODEL_CALL.match(request.url.path):  # a bad token or too many calls, told as OpenAI's clients expect
                response = openai_error(err.status, err.message, err.headers)
            else:
                response = JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)
        if request.method in MUTATING and not MODEL_CALL.match(request.url.path):
            row = Audit(at=time.time(), user_id=caller.user_id if caller else None, token_id=caller.token_id if caller else None,
                        project_id=caller.project_id if caller else None, method=request.method, path=request.url.path[:1000],
                        status=response.status_code, client=request.client.host if request.client else None)
            await run_in_threadpool(_write_audit, self.store, row)
        return response

    async def _authenticate(self, request: Request) -> Caller:
        if "\x00" in request.url.path or any("\x00" in v for v in request.query_params.values()):
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


def _write_audit(store: Store, row: Audit) -> None:
    with store.session() as s:
        s.add(row)
