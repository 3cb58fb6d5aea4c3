"""A project's endpoints: models served from its clusters, and the relay to them (`service.relay`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from supercluster.service import endpoints, relay
from supercluster.service.auth import Caller
from supercluster.service.deps import caller
from supercluster.service.schemas import EndpointIn
from supercluster.service.store import Store


def routes(store: Store) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/projects/{project}/endpoints", status_code=202, tags=["endpoints"])
    def create_endpoint(project: str, body: EndpointIn, who: Caller = Depends(caller)) -> dict:
        """Serve a run directory from one of the project's clusters; poll until its state is ready."""
        return endpoints.create(store, who, project, body.name, body.cluster, body.run_dir, body.job, body.max_running,
                                body.quantize, body.min_replicas, body.max_replicas)

    @router.get("/v1/projects/{project}/endpoints", tags=["endpoints"])
    def list_endpoints(project: str, who: Caller = Depends(caller)) -> list[dict]:
        return endpoints.list_all(store, who, project)

    @router.get("/v1/projects/{project}/endpoints/{name}", tags=["endpoints"])
    def show_endpoint(project: str, name: str, who: Caller = Depends(caller)) -> dict:
        return endpoints.show(store, who, project, name)

    @router.delete("/v1/projects/{project}/endpoints/{name}", status_code=202, tags=["endpoints"])
    def delete_endpoint(project: str, name: str, who: Caller = Depends(caller)) -> dict:
        """Stop the endpoint's server (its calls stay counted); poll GET .../endpoints/{name} while its
        state is stopping, until stopped."""
        return endpoints.delete(store, who, project, name)

    # One function, two routes with their own operation ids (one route of both methods shares one id in OpenAPI).
    @router.get("/v1/projects/{project}/endpoints/{name}/v1/{path:path}", tags=["endpoints"], operation_id="endpoint_get")
    @router.post("/v1/projects/{project}/endpoints/{name}/v1/{path:path}", tags=["endpoints"], operation_id="endpoint_post")
    async def call_endpoint(project: str, name: str, path: str, request: Request, who: Caller = Depends(caller)):
        """The endpoint's OpenAI API (`chat/completions`, `completions`, `models`) with a member's project token:
        point an OpenAI client's base_url here."""
        return await relay.call(store, request, who, project, name, path)

    return router
