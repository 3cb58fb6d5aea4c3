"""The FastAPI application, put together: the gate, one router per resource, the dashboard.

Routes are plain (sync) functions where they only call the database: FastAPI runs them in its
thread pool, and the calls they make block only that thread. What waits long (a log followed, a
model's answer relayed) is asynchronous and waits on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import anyio.to_thread
import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from supercluster.errors import UserError
from supercluster.service import endpoints, replicas, resources
from supercluster.service.audit import AuditLog
from supercluster.service.auth import ServiceError
from supercluster.service.gate import Gate
from supercluster.service.router import Router
from supercluster.service.routes import clusters, fleet, jobs, tenancy, usage
from supercluster.service.routes import endpoints as endpoint_routes
from supercluster.service.store import Store

DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"
REQUEST_THREADS = 4  # threads running the plain (sync) routes, per worker process


def create_app(url: str | None = None, *, rate: float = 50.0, burst: int = 200, store: Store | None = None,
               tick_s: float = 0.0, scale: bool | None = None) -> FastAPI:
    """The service on the database at `url`; `rate`/`burst`: requests per second per token (token bucket);
    `tick_s`: seconds between the server's own passes over budgets and queues (0: only when asked);
    `scale`: run the endpoints' scaler (`service.replicas`; default: where the passes run)."""
    store = store or Store(url)
    audit = AuditLog(store)
    gate = Gate(store, rate, burst, audit)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # Fewer request threads than anyio's 40: on a database call each waits mostly for the GIL
        # and the database's lock. Under bench/service.py, 40 let reads run ahead of the writes
        # queued on the fleet's lock (reads' p99 2.4-3.4 s, writes' 8-13 s); 8 kept every route's
        # p99 near the others (3-5 s) at the same throughput. Once a write cost less under the lock,
        # 4 did better again: fewer readers beside the thread that holds it, which must win the GIL
        # back at each SQLite call (2 workers, twice each: creates' p99 0.83-0.92 s against 0.90-1.03).
        anyio.to_thread.current_default_thread_limiter().total_tokens = REQUEST_THREADS
        stop = threading.Event()
        if tick_s > 0:
            threading.Thread(target=_ticker, args=(store, tick_s, stop), daemon=True, name="service-tick").start()
        if scale if scale is not None else tick_s > 0:  # one scaler per service: where the passes run
            threading.Thread(target=replicas.Scaler(store).run, args=(stop,), daemon=True, name="endpoint-scaler").start()
        # to endpoints' model servers: generations take long, connecting must not
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0)) as client:
            _app.state.http = client
            yield
        stop.set()
        audit.close()  # rows of calls answered so far are committed already; this writes the rest

    app = FastAPI(title="supercluster", version="1", lifespan=lifespan, description="Many teams share one fleet: tenants, "
                  "tokens, quotas, clusters, jobs, usage and cost. Every route needs a Bearer token.")
    app.state.store = store
    app.state.router = Router()
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(gate)
    for router in (tenancy.routes(store, gate.callers), clusters.routes(store), jobs.routes(store),
                   endpoint_routes.routes(store), usage.routes(store), fleet.routes(store)):
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    @app.get("/dashboard", include_in_schema=False)
    def dashboard():
        """The dashboard: a static page; it asks for a token and calls the API with it."""
        return HTMLResponse(DASHBOARD.read_text())

    return app


async def _service_error(_request, err: ServiceError):
    return JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)


async def _user_error(_request, err: UserError):
    return JSONResponse({"detail": str(err)}, status_code=422)


async def _invalid(_request, err: RequestValidationError):
    return JSONResponse({"detail": _sentence(err)}, status_code=422)


def _sentence(err: RequestValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = len(err.errors()) - 1
    return f"Field {where!r}: {first.get('msg', 'is not valid')}" + (f" (and {more} more problems)." if more else ".")


def _ticker(store: Store, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            resources.tick(store)
            endpoints.refresh_all(store)
        except Exception:  # a failed pass must not end the loop; the next one tries again
            logging.getLogger("supercluster.service").exception("budget and queue pass failed")
