"""A project's training jobs: submit, follow (status, log as server-sent events, metrics), cancel."""

from __future__ import annotations

import json
import time

import anyio
from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from supercluster.service import resources
from supercluster.service.auth import Caller
from supercluster.service.deps import caller
from supercluster.service.schemas import JobIn
from supercluster.service.store import Store


def routes(store: Store) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/projects/{project}/jobs", status_code=202, tags=["jobs"])
    def submit_job(project: str, body: JobIn, who: Caller = Depends(caller)) -> dict:
        """Launches a training run; poll GET .../jobs/{id} for its state."""
        return resources.submit_job(store, who, project, body.cluster, body.config, body.overrides, body.max_restarts)

    @router.get("/v1/projects/{project}/jobs", tags=["jobs"])
    def list_jobs(project: str, who: Caller = Depends(caller)) -> list[dict]:
        return resources.list_jobs(store, who, project)

    @router.get("/v1/projects/{project}/jobs/{job_id}", tags=["jobs"])
    def job_status(project: str, job_id: int = Path(ge=1, le=2**31 - 1), who: Caller = Depends(caller)) -> dict:
        return resources.job_status(store, who, project, job_id)

    @router.delete("/v1/projects/{project}/jobs/{job_id}", tags=["jobs"])
    def cancel_job(project: str, job_id: int = Path(ge=1, le=2**31 - 1), who: Caller = Depends(caller)) -> dict:
        return resources.cancel_job(store, who, project, job_id)

    @router.get("/v1/projects/{project}/jobs/{job_id}/logs", tags=["jobs"], response_class=StreamingResponse)
    def job_logs(project: str, job_id: int = Path(ge=1, le=2**31 - 1), follow: bool = False,
                 timeout_s: float = Query(600.0, gt=0, le=3600), who: Caller = Depends(caller)):
        """The job's log as server-sent events (one `data:` per line); follow=true streams until the job ends."""
        path = resources.job_log(store, who, project, job_id)
        return StreamingResponse(_sse_lines(store, job_id, path, follow, timeout_s), media_type="text/event-stream")

    @router.get("/v1/projects/{project}/jobs/{job_id}/metrics", tags=["jobs"])
    def job_metrics(project: str, job_id: int = Path(ge=1, le=2**31 - 1), who: Caller = Depends(caller)) -> dict:
        """The job's training steps from its metrics.jsonl (step, loss, tokens_per_s, mfu, ...)."""
        return {"id": job_id, "steps": resources.job_metrics(store, who, project, job_id)}

    return router


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
