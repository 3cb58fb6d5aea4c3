"""The FastAPI application: every route authenticates its caller, every mutating call is audited.

Routes are plain (sync) functions: FastAPI runs them in its thread pool, and the database calls
they make block only that thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from pathlib import Path as FilePath
import time
from typing import Literal

import anyio
import httpx
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from supercluster.errors import UserError
from supercluster.serve.disconnect import ClientGone, unless_client_leaves
from supercluster.service import endpoints, resources, tenancy, usage
from supercluster.service.auth import Caller, CallerCache, RateLimiter, ServiceError, authenticate_hash, bearer_hash
from supercluster.service.models import Audit
from supercluster.service.schemas import ClusterIn, DrainIn, EndpointIn, JobIn, OrgIn, PlanIn, ProjectIn, QuotaIn, TokenIn, UserIn
from supercluster.service.store import Store

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
# Calls to a model through an endpoint change nothing: they are counted for usage, not audited.
MODEL_CALL = re.compile(r"^/v1/projects/[^/]+/endpoints/[^/]+/v1/")
PROXIED = ("chat/completions", "completions", "models")
DASHBOARD = FilePath(__file__).parent / "static" / "dashboard.html"
_bearer = HTTPBearer(auto_error=False, description="An API token from `supercluster server init` or POST /v1/tokens.")


def _sentence(err: RequestValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    more = len(err.errors()) - 1
    return f"Field {where!r}: {first.get('msg', 'is not valid')}" + (f" (and {more} more problems)." if more else ".")


def create_app(url: str | None = None, *, rate: float = 50.0, burst: int = 200, store: Store | None = None,
               tick_s: float = 0.0) -> FastAPI:
    """The service on the database at `url`; `rate`/`burst`: requests per second per token (token bucket);
    `tick_s`: seconds between the server's own passes over budgets and queues (0: only when asked)."""
    store = store or Store(url)
    limiter = RateLimiter(rate, burst)
    guesses = RateLimiter(rate=1.0, burst=20, what="unknown tokens from this address")  # per client address
    callers = CallerCache()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        stop = threading.Event()
        if tick_s > 0:
            threading.Thread(target=_ticker, args=(store, tick_s, stop), daemon=True, name="service-tick").start()
        # to endpoints' model servers: generations take long, connecting must not
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0)) as client:
            _app.state.http = client
            yield
        stop.set()

    app = FastAPI(title="supercluster", version="1", lifespan=lifespan, description="Many teams share one fleet: tenants, "
                  "tokens, quotas, clusters, jobs, usage and cost. Every route needs a Bearer token.")
    app.state.store = store

    @app.exception_handler(ServiceError)
    async def _service_error(_request, err: ServiceError):
        return JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)

    @app.exception_handler(UserError)
    async def _user_error(_request, err: UserError):
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, err: RequestValidationError):
        return JSONResponse({"detail": _sentence(err)}, status_code=422)

    @app.middleware("http")
    async def _gate_and_audit(request: Request, call_next):
        """Authenticates every /v1 call before anything else reads it (a malformed body from a
        caller without a valid token gets 401, not a parse error), then audits it if it mutates."""
        caller = None
        try:
            if request.url.path.startswith("/v1/"):
                if "\x00" in request.url.path or any("\x00" in v for v in request.query_params.values()):
                    raise ServiceError(422, "Names and query values cannot contain NUL characters.")
                token_hash = bearer_hash(request.headers.get("authorization"))
                caller = callers.get(token_hash)
                if caller is None:
                    # Unknown tokens cost a database read each: an address that keeps sending them is
                    # held back as a token that calls too often is (429), before the read.
                    address = request.client.host if request.client else "?"
                    guesses.check(address, spend=False)
                    try:
                        caller = await run_in_threadpool(_authenticate, store, callers, token_hash)
                    except ServiceError as err:
                        if err.status == 401:
                            guesses.check(address)
                        raise
                request.state.caller = caller
                limiter.check(caller.token_id)
            response = await call_next(request)
        except ServiceError as err:
            if MODEL_CALL.match(request.url.path):  # a bad token or too many calls, told as OpenAI's clients expect
                response = _openai_error(err.status, err.message, err.headers)
            else:
                response = JSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers)
        if request.method in MUTATING and not MODEL_CALL.match(request.url.path):
            row = Audit(at=time.time(), user_id=caller.user_id if caller else None, token_id=caller.token_id if caller else None,
                        project_id=caller.project_id if caller else None, method=request.method, path=request.url.path[:1000],
                        status=response.status_code, client=request.client.host if request.client else None)
            await run_in_threadpool(_write_audit, store, row)
        return response

    def caller(request: Request, _creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Caller:
        return request.state.caller  # set by the gate above (declared here so OpenAPI shows the Bearer scheme)

    # ---- tenancy -----------------------------------------------------------------------------

    @app.post("/v1/orgs", status_code=201, tags=["tenancy"])
    def create_org(body: OrgIn, who: Caller = Depends(caller)) -> dict:
        with store.session() as s:
            return tenancy.create_org(s, who, body.name)

    @app.get("/v1/orgs", tags=["tenancy"])
    def list_orgs(who: Caller = Depends(caller)) -> list[dict]:
        with store.reading() as s:
            return tenancy.list_orgs(s, who)

    @app.get("/v1/orgs/{org}", tags=["tenancy"])
    def show_org(org: str, who: Caller = Depends(caller)) -> dict:
        with store.reading() as s:
            return tenancy.org_dict(tenancy.visible_org(s, who, org))

    @app.post("/v1/orgs/{org}/projects", status_code=201, tags=["tenancy"])
    def create_project(org: str, body: ProjectIn, who: Caller = Depends(caller)) -> dict:
        with store.session() as s:
            return tenancy.create_project(s, who, org, body.name)

    @app.get("/v1/orgs/{org}/projects", tags=["tenancy"])
    def list_projects(org: str, who: Caller = Depends(caller)) -> list[dict]:
        with store.reading() as s:
            return tenancy.list_projects(s, who, org)

    @app.post("/v1/users", status_code=201, tags=["tenancy"])
    def create_user(body: UserIn, who: Caller = Depends(caller)) -> dict:
        with store.session() as s:
            return tenancy.create_user(s, who, body.name, body.org)

    @app.get("/v1/users", tags=["tenancy"])
    def list_users(who: Caller = Depends(caller)) -> list[dict]:
        with store.reading() as s:
            return tenancy.list_users(s, who)

    @app.post("/v1/tokens", status_code=201, tags=["tenancy"])
    def create_token(body: TokenIn, who: Caller = Depends(caller)) -> dict:
        """A new token; its secret is in this answer only (it is stored hashed)."""
        with store.session() as s:
            return tenancy.create_token(s, who, body.user, body.project, body.role, body.days)

    @app.get("/v1/tokens", tags=["tenancy"])
    def list_tokens(who: Caller = Depends(caller)) -> list[dict]:
        with store.reading() as s:
            return tenancy.list_tokens(s, who)

    @app.delete("/v1/tokens/{token_id}", tags=["tenancy"])
    def revoke_token(token_id: int = Path(ge=1, le=2**31 - 1), who: Caller = Depends(caller)) -> dict:
        with store.session() as s:
            revoked = tenancy.revoke_token(s, who, token_id)
        callers.forget()  # after the commit: a request in between would keep it for another ttl
        return revoked

    @app.get("/v1/audit", tags=["tenancy"])
    def audit(limit: int = Query(100, ge=1, le=10_000), who: Caller = Depends(caller)) -> list[dict]:
        tenancy.require(who, "admin")
        with store.reading() as s:
            query = sa.select(Audit).order_by(Audit.id.desc()).limit(limit)
            if not who.is_operator:
                query = query.where(Audit.project_id == who.project_id)
            return [{"id": a.id, "at": a.at, "user_id": a.user_id, "token_id": a.token_id, "method": a.method,
                     "path": a.path, "status": a.status, "client": a.client} for a in s.scalars(query)]

    # ---- clusters, jobs, quota ---------------------------------------------------------------

    @app.post("/v1/projects/{project}/clusters", status_code=202, tags=["clusters"])
    def create_cluster(project: str, body: ClusterIn, who: Caller = Depends(caller)) -> dict:
        """Places the cluster or queues it; poll GET .../clusters/{name} until state is ready."""
        return resources.create_cluster(store, who, project, body.name, body.gpus, body.gpu_type, body.max_switches,
                                        body.require_health, body.priority)

    @app.get("/v1/projects/{project}/clusters", tags=["clusters"])
    def list_clusters(project: str, who: Caller = Depends(caller)) -> list[dict]:
        return resources.list_clusters(store, who, project)

    @app.get("/v1/projects/{project}/clusters/{name}", tags=["clusters"])
    def show_cluster(project: str, name: str, who: Caller = Depends(caller)) -> dict:
        return resources.show_cluster(store, who, project, name)

    @app.delete("/v1/projects/{project}/clusters/{name}", tags=["clusters"])
    def delete_cluster(project: str, name: str, force: bool = False, who: Caller = Depends(caller)) -> dict:
        return resources.delete_cluster(store, who, project, name, force)

    @app.post("/v1/projects/{project}/jobs", status_code=202, tags=["jobs"])
    def submit_job(project: str, body: JobIn, who: Caller = Depends(caller)) -> dict:
        """Launches a training run; poll GET .../jobs/{id} for its state."""
        return resources.submit_job(store, who, project, body.cluster, body.config, body.overrides, body.max_restarts)

    @app.get("/v1/projects/{project}/jobs", tags=["jobs"])
    def list_jobs(project: str, who: Caller = Depends(caller)) -> list[dict]:
        return resources.list_jobs(store, who, project)

    @app.get("/v1/projects/{project}/jobs/{job_id}", tags=["jobs"])
    def job_status(project: str, job_id: int = Path(ge=1, le=2**31 - 1), who: Caller = Depends(caller)) -> dict:
        return resources.job_status(store, who, project, job_id)

    @app.delete("/v1/projects/{project}/jobs/{job_id}", tags=["jobs"])
    def cancel_job(project: str, job_id: int = Path(ge=1, le=2**31 - 1), who: Caller = Depends(caller)) -> dict:
        return resources.cancel_job(store, who, project, job_id)

    @app.get("/v1/projects/{project}/jobs/{job_id}/logs", tags=["jobs"], response_class=StreamingResponse)
    def job_logs(project: str, job_id: int = Path(ge=1, le=2**31 - 1), follow: bool = False,
                 timeout_s: float = Query(600.0, gt=0, le=3600), who: Caller = Depends(caller)):
        """The job's log as server-sent events (one `data:` per line); follow=true streams until the job ends."""
        path = resources.job_log(store, who, project, job_id)
        return StreamingResponse(_sse_lines(store, job_id, path, follow, timeout_s), media_type="text/event-stream")

    @app.get("/v1/projects/{project}/quota", tags=["quota"])
    def show_quota(project: str, who: Caller = Depends(caller)) -> dict:
        with store.reading() as s:
            return resources.quota_view(s, tenancy.visible_project(s, who, project))

    @app.put("/v1/projects/{project}/quota", tags=["quota"])
    def set_quota(project: str, body: QuotaIn, who: Caller = Depends(caller)) -> dict:
        tenancy.require_operator(who)
        with store.session() as s:
            p = tenancy.visible_project(s, who, project)
            return resources.set_quota(s, p, body.gpu_type, body.max_gpus, body.gpu_hours, body.max_priority)

    # ---- endpoints: models served from a project's clusters ------------------------------------

    @app.post("/v1/projects/{project}/endpoints", status_code=202, tags=["endpoints"])
    def create_endpoint(project: str, body: EndpointIn, who: Caller = Depends(caller)) -> dict:
        """Serve a run directory from one of the project's clusters; poll until its state is ready."""
        return endpoints.create(store, who, project, body.name, body.cluster, body.run_dir, body.job, body.max_running,
                                body.quantize)

    @app.get("/v1/projects/{project}/endpoints", tags=["endpoints"])
    def list_endpoints(project: str, who: Caller = Depends(caller)) -> list[dict]:
        return endpoints.list_all(store, who, project)

    @app.get("/v1/projects/{project}/endpoints/{name}", tags=["endpoints"])
    def show_endpoint(project: str, name: str, who: Caller = Depends(caller)) -> dict:
        return endpoints.show(store, who, project, name)

    @app.delete("/v1/projects/{project}/endpoints/{name}", tags=["endpoints"])
    def delete_endpoint(project: str, name: str, who: Caller = Depends(caller)) -> dict:
        """Stop the endpoint's server (its calls stay counted)."""
        return endpoints.delete(store, who, project, name)

    # One function, two routes with their own operation ids (one route of both methods shares one id in OpenAPI).
    @app.get("/v1/projects/{project}/endpoints/{name}/v1/{path:path}", tags=["endpoints"], operation_id="endpoint_get")
    @app.post("/v1/projects/{project}/endpoints/{name}/v1/{path:path}", tags=["endpoints"], operation_id="endpoint_post")
    async def call_endpoint(project: str, name: str, path: str, request: Request, who: Caller = Depends(caller)):
        """The endpoint's OpenAI API (`chat/completions`, `completions`, `models`) with a member's project token:
        point an OpenAI client's base_url here."""
        if path not in PROXIED:
            return _openai_error(404, f"Endpoints answer {', '.join('/v1/' + p for p in PROXIED)}; not /v1/{path}.")
        try:
            endpoint_id, url, secret = await run_in_threadpool(endpoints.upstream, store, who, project, name)
        except ServiceError as err:
            return _openai_error(err.status, err.message)
        body, tally = await request.body(), None  # tally: of a streamed call
        if request.method == "POST":
            try:
                payload = json.loads(body)
            except ValueError:
                return _openai_error(400, "The request body is not JSON.")
            if isinstance(payload, dict) and payload.get("stream"):
                tally = endpoints.StreamTally(payload.get("stream_options"))
                payload["stream_options"] = endpoints.stream_options(payload.get("stream_options"))
                body = json.dumps(payload).encode()
        client: httpx.AsyncClient = request.app.state.http
        upstream = client.build_request(request.method, f"{url}/v1/{path}", content=body if request.method == "POST" else None,
                                        headers={"authorization": f"Bearer {secret}", "content-type": "application/json"})
        try:  # a caller that leaves closes the call to the server too, which then stops generating
            answer = await unless_client_leaves(request, client.send(upstream, stream=True))
        except ClientGone:  # a whole answer's headers come with its end
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except httpx.HTTPError as err:
            return _openai_error(502, f"Endpoint {name!r} does not answer ({type(err).__name__}); see its state and job log.")
        counted = request.method == "POST" and answer.status_code == 200
        if tally is None or answer.status_code != 200:
            try:
                data = await unless_client_leaves(request, answer.aread())
            except ClientGone:
                return Response(status_code=499)
            except httpx.HTTPError as err:
                return _openai_error(502, f"Endpoint {name!r} failed mid-answer ({type(err).__name__}); see its state "
                                          f"and job log.")
            finally:
                await answer.aclose()
            if counted:
                await run_in_threadpool(endpoints.record, store, endpoint_id, who.user_id, endpoints.usage_of_answer(data))
            return Response(data, status_code=answer.status_code, media_type=answer.headers.get("content-type"))

        async def relay():
            try:
                buffer = b""
                try:
                    async for chunk in answer.aiter_bytes():
                        buffer += chunk
                        while b"\n\n" in buffer:
                            event, buffer = buffer.split(b"\n\n", 1)
                            if (out := tally.pass_on(event)) is not None:
                                yield out + b"\n\n"
                    failure = None if tally.done else "ended its stream early"
                except httpx.HTTPError as err:
                    failure = f"stopped answering mid-stream ({type(err).__name__})"
                if failure:  # told as OpenAI's streams tell errors, then ended as every stream ends
                    yield endpoints.error_event(f"Endpoint {name!r} {failure}; see its state and job log.") + b"\n\n"
                    yield b"data: [DONE]\n\n"
            finally:
                # Also when the caller left mid-stream and this task is being cancelled: what was relayed counts.
                with anyio.CancelScope(shield=True):
                    await answer.aclose()
                    await run_in_threadpool(endpoints.record, store, endpoint_id, who.user_id, tally.usage)

        return StreamingResponse(relay(), media_type="text/event-stream")

    # ---- usage, fleet, plans -----------------------------------------------------------------

    @app.get("/v1/usage", tags=["usage"], responses={200: {"content": {"text/csv": {}}}})
    def show_usage(by: Literal["org", "project", "user"] = "project", since: float | None = Query(None, ge=0, le=1e11),
                   until: float | None = Query(None, ge=0, le=1e11), format: Literal["json", "csv"] = "json",
                   who: Caller = Depends(caller)):
        """GPU-seconds, GPU-hours and cost by org, project or user and GPU type, in [since, until); in JSON
        also `tokens`: the requests and tokens the project's endpoints answered."""
        mine = None if who.is_operator else [who.project_id]
        with store.reading() as s:
            rows = usage.report(s, by=by, since=since, until=until, project_ids=mine)
            tokens = endpoints.token_report(s, by=by, since=since, until=until, project_ids=mine)
        if format == "csv":
            return PlainTextResponse(usage.to_csv(rows, tokens), media_type="text/csv")
        from supercluster.service import prices

        return {"by": by, "since": since, "until": until, "rows": rows, "tokens": tokens, "prices": prices.table()}

    @app.get("/v1/fleet", tags=["fleet"])
    def fleet(who: Caller = Depends(caller)) -> dict:
        """Nodes by pod and leaf switch; clusters on them are named only where they are the caller's."""
        from supercluster.cluster.fleet import summary

        info = summary(store.fleet)
        with store.reading() as s:
            mine = resources.fleet_names(s, who)
        for node in info["node_list"]:
            node["clusters"] = sorted(mine[c] for c in node["clusters"] if c in mine)
        return info

    @app.get("/v1/fleet/health", tags=["fleet"])
    def fleet_health(limit: int = Query(100, ge=1, le=10_000), who: Caller = Depends(caller)) -> list[dict]:
        """The latest health check results of the fleet's nodes, newest first."""
        from supercluster.cluster.fleet import health_history

        return health_history(store.fleet, limit=limit)

    def _operator_node(who: Caller, name: str) -> None:
        from supercluster.cluster.fleet import has_node

        tenancy.require_operator(who)
        if not has_node(store.fleet, name):
            raise ServiceError(404, f"No node {name!r} in the fleet; GET /v1/fleet lists them.")

    @app.post("/v1/fleet/nodes/{name}/drain", tags=["fleet"])
    def drain_node(name: str, body: DrainIn, who: Caller = Depends(caller)) -> dict:
        """Take a node out of placement (the operator's); clusters on it keep it until deleted."""
        from supercluster.cluster.fleet import drain_node

        _operator_node(who, name)
        drain_node(name, body.reason, db=store.fleet)
        return {"node": name, "state": "drain", "reason": body.reason}

    @app.post("/v1/fleet/nodes/{name}/undrain", tags=["fleet"])
    def undrain_node(name: str, who: Caller = Depends(caller)) -> dict:
        """Return a drained or down node to service (the operator's); queued clusters that now fit start."""
        _operator_node(who, name)
        return {"node": name, "state": "up", "started": resources.undrain_node(store, name)}

    @app.get("/v1/whoami", tags=["tenancy"])
    def whoami(who: Caller = Depends(caller)) -> dict:
        return {"user": who.user, "role": who.role, "project": who.project, "operator": who.is_operator}

    @app.get("/v1/projects/{project}/jobs/{job_id}/metrics", tags=["jobs"])
    def job_metrics(project: str, job_id: int = Path(ge=1, le=2**31 - 1), who: Caller = Depends(caller)) -> dict:
        """The job's training steps from its metrics.jsonl (step, loss, tokens_per_s, mfu, ...)."""
        return {"id": job_id, "steps": resources.job_metrics(store, who, project, job_id)}

    @app.get("/", include_in_schema=False)
    @app.get("/dashboard", include_in_schema=False)
    def dashboard():
        """The dashboard: a static page; it asks for a token and calls the API with it."""
        return HTMLResponse(DASHBOARD.read_text())

    @app.post("/v1/plans", tags=["plans"])
    def plans(body: PlanIn, who: Caller = Depends(caller)) -> dict:
        """The planner: ranked parallel layouts for a model on `gpus` GPUs (nothing is allocated)."""
        from supercluster.plan import build_model, build_request, search

        req = build_request(build_model(body.model), body.gpus, gpu=body.gpu, seq_len=body.seq_len,
                            global_batch=body.global_batch)
        return {"plans": [e.as_dict() for e in search(req, top=body.top)]}

    return app


def _openai_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """An error as OpenAI's clients expect it on the model routes."""
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status_code=status,
                        headers=headers)


def _ticker(store: Store, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            resources.tick(store)
            endpoints.refresh_all(store)
        except Exception:  # a failed pass must not end the loop; the next one tries again
            logging.getLogger("supercluster.service").exception("budget and queue pass failed")


def _authenticate(store: Store, callers: CallerCache, token_hash: str) -> Caller:
    generation = callers.generation
    with store.reading() as s:
        caller, expires_at = authenticate_hash(s, token_hash)
    callers.put(token_hash, caller, expires_at, generation)
    return caller


def _write_audit(store: Store, row: Audit) -> None:
    with store.session() as s:
        s.add(row)


def _read_from(path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return b""


async def _sse_lines(store: Store, job_id: int, path, follow: bool, timeout_s: float):
    """The log as events. Asynchronous, so that a follower waits on the event loop, not in one of
    the server's worker threads (45 followers once held them all, and every other request waited);
    only the short reads run in a thread."""
    deadline = time.monotonic() + timeout_s
    offset = 0
    while True:
        active = follow and await run_in_threadpool(resources.job_active, store, job_id)
        chunk = await run_in_threadpool(_read_from, path, offset)
        # only whole lines: a line still being written waits for the next pass
        end = chunk.rfind(b"\n") + 1 if active else len(chunk)
        for line in chunk[:end].decode(errors="replace").splitlines():
            yield f"data: {line}\n\n"
        offset += end
        if not active or time.monotonic() > deadline:
            state = await run_in_threadpool(resources.job_status_raw, store, job_id)
            yield f"event: end\ndata: {json.dumps({'state': state})}\n\n"
            return
        await anyio.sleep(0.5)
