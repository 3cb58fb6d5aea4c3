"""The relay from the service to an endpoint's model server: OpenAI's routes with a project token.

The service checks the caller's token (the gate), forwards the call with the endpoint's own key,
relays a stream as it comes, and counts what was answered for usage however the call ends: the
caller leaving, the model server dying mid-stream (an OpenAI-shaped error event, then `[DONE]`).
A caller's whole answer is asked as a stream too and rebuilt (`service.whole`), so that one who
leaves before it is ready is charged for what was generated until then.
"""

from __future__ import annotations

import json

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from supercluster.serve.disconnect import ClientGone, unless_client_leaves
from supercluster.service import endpoints
from supercluster.service.auth import Caller, ServiceError
from supercluster.service.router import Replica, Router
from supercluster.service.store import Store
from supercluster.service.whole import WholeAnswer

PROXIED = ("chat/completions", "completions", "models")


def openai_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """An error as OpenAI's clients expect it on the model routes."""
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status_code=status,
                        headers=headers)


async def call(store: Store, request: Request, who: Caller, project: str, name: str, path: str) -> Response:
    """Forwards one call to a replica of endpoint `name` (the router's choice) and answers with what it answered.

    A replica that cannot be reached, or whose whole answer breaks off, is told to the router and
    the call goes to another (nothing of it reached the caller yet); a stream that breaks off after
    it began ends with an error event instead."""
    if path not in PROXIED:
        return openai_error(404, f"Endpoints answer {', '.join('/v1/' + p for p in PROXIED)}; not /v1/{path}.")
    try:
        endpoint_id, replicas, secret = await run_in_threadpool(endpoints.upstream, store, who, project, name)
    except ServiceError as err:
        return openai_error(err.status, err.message)
    body, payload, asked, whole = await request.body(), None, None, False  # whole: the caller wants one whole answer
    if request.method == "POST":
        try:
            payload = json.loads(body)
        except ValueError:
            return openai_error(400, "The request body is not JSON.")
        if isinstance(payload, dict):
            # Always asked as a stream with the usage in every chunk: a caller that leaves is
            # charged for what was generated until then, whether it asked for a stream or not.
            asked = payload.get("stream_options") if payload.get("stream") else None
            whole, payload["stream"] = not payload.get("stream"), True
            payload["stream_options"] = endpoints.stream_options(asked)
            body = json.dumps(payload).encode()
    client: httpx.AsyncClient = request.app.state.http
    router: Router = request.app.state.router
    key, tried, failure = router.key(payload), set(), None
    while (replica := router.pick(endpoint_id, replicas, key, tried)) is not None:
        tried.add(replica.index)
        tally = endpoints.StreamTally(asked) if isinstance(payload, dict) else None  # fresh for each try: the usage so far
        upstream = client.build_request(request.method, f"{replica.url}/v1/{path}",
                                        content=body if request.method == "POST" else None,
                                        headers={"authorization": f"Bearer {secret}", "content-type": "application/json"})
        try:  # a caller that leaves closes the call to the server too, which then stops generating
            answer = await unless_client_leaves(request, client.send(upstream, stream=True))
        except ClientGone:
            router.done(endpoint_id, replica)
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except httpx.HTTPError as err:
            router.done(endpoint_id, replica, failed=True)
            failure = openai_error(502, f"Endpoint {name!r} does not answer ({type(err).__name__}); see its state and job log.")
            continue
        counted = request.method == "POST" and answer.status_code == 200
        if tally is not None and counted and not whole:
            return StreamingResponse(_relay(store, router, endpoint_id, replica, who, name, answer, tally),
                                     media_type="text/event-stream")
        failed = False
        try:
            if tally is not None and counted:
                return await _whole(store, request, who, endpoint_id, replica.index, name, answer, tally)
            data = await unless_client_leaves(request, answer.aread())
        except ClientGone:
            return Response(status_code=499)
        except httpx.HTTPError as err:  # nothing of it reached the caller: another replica may answer
            failed, failure = True, _broke_off(name, type(err).__name__)
            continue
        finally:
            await answer.aclose()
            router.done(endpoint_id, replica, failed=failed)
        if counted:
            await run_in_threadpool(endpoints.record, store, endpoint_id, replica.index, who.user_id,
                                    endpoints.usage_of_answer(data))
        return Response(data, status_code=answer.status_code, media_type=answer.headers.get("content-type"))
    return failure


def _broke_off(name: str, why: str) -> JSONResponse:
    return openai_error(502, f"Endpoint {name!r} failed mid-answer ({why}); see its state and job log.")


async def _relay(store: Store, router: Router, endpoint_id: int, replica: Replica, who: Caller, name: str,
                 answer: httpx.Response, tally: endpoints.StreamTally):
    recorded, failure = False, None

    async def count() -> None:
        nonlocal recorded
        if not recorded:
            recorded = True
            await run_in_threadpool(endpoints.record, store, endpoint_id, replica.index, who.user_id, tally.usage)

    try:
        buffer = b""
        try:
            async for chunk in answer.aiter_bytes():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    out = tally.pass_on(event)
                    if tally.done:  # counted before the caller sees the end: a usage read then includes it
                        await count()
                    if out is not None:
                        yield out + b"\n\n"
            failure = None if tally.done else "ended its stream early"
        except httpx.HTTPError as err:
            failure = f"stopped answering mid-stream ({type(err).__name__})"
        if failure:  # told as OpenAI's streams tell errors, then ended as every stream ends
            await count()
            yield endpoints.error_event(f"Endpoint {name!r} {failure}; see its state and job log.") + b"\n\n"
            yield b"data: [DONE]\n\n"
    finally:
        # Also when the caller left mid-stream and this task is being cancelled: what was relayed counts.
        with anyio.CancelScope(shield=True):
            router.done(endpoint_id, replica, failed=failure is not None and "mid-stream" in failure)
            await answer.aclose()
            await count()


async def _whole(store: Store, request: Request, who: Caller, endpoint_id: int, replica: int, name: str,
                 answer: httpx.Response, tally: endpoints.StreamTally) -> Response:
    """A caller's whole answer, rebuilt from the stream the model server sends. A caller that
    leaves first is charged for the tokens generated until then (the call to the server is closed,
    so it stops); a server that fails mid-way is a 502, charged nothing (the caller got nothing),
    or, when its connection broke (the httpx error is raised), left for `call` to try another replica."""
    whole = WholeAnswer()

    async def collect() -> None:
        buffer = b""
        async for chunk in answer.aiter_bytes():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                whole.add(event)
                tally.pass_on(event)

    try:
        await unless_client_leaves(request, collect())
    except ClientGone:
        await run_in_threadpool(endpoints.record, store, endpoint_id, replica, who.user_id, tally.usage)
        raise
    if whole.error is not None or not tally.done:
        why = (whole.error.get("error") or {}).get("message") if whole.error else "it ended its answer early"
        return _broke_off(name, why)
    await run_in_threadpool(endpoints.record, store, endpoint_id, replica, who.user_id, tally.usage)
    return JSONResponse(whole.answer(tally.usage))
