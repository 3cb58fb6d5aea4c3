"""GPU-hours, cost and endpoint tokens, by org, project or user."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse

from supercluster.service import endpoints, usage
from supercluster.service.auth import Caller
from supercluster.service.deps import caller
from supercluster.service.routes import JSON
from supercluster.service.store import Store


def routes(store: Store) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/usage", tags=["usage"], responses={200: {"content": {"text/csv": {}}}})
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

        # JSON directly: FastAPI would walk the rows through its encoder first (they are plain JSON already).
        return JSON({"by": by, "since": since, "until": until, "rows": rows, "tokens": tokens, "prices": prices.table()})

    return router
