"""Noticing an HTTP client that leaves before its answer is ready.

A non-streamed answer is computed while nothing reads from the client, so Starlette does not
see it go: generation would run to the end for nobody, holding its KV blocks. Once the body is
read, ASGI's `receive` returns only when the client disconnects; waiting on it beside the work
notices at once. (Polling `is_disconnected` between results misses it while results keep coming.)
Without torch, so the service's relay can use it too.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; ClientGone (with `work` cancelled) as soon as the client disconnects."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled: neither task outlives it
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGone
