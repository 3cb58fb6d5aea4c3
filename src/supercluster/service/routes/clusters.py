"""A project's clusters and its quota (carried out by `service.resources`, placed by the fleet)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from supercluster.service import resources, tenancy
from supercluster.service.auth import Caller
from supercluster.service.deps import caller
from supercluster.service.routes import JSON
from supercluster.service.schemas import ClusterIn, QuotaIn
from supercluster.service.store import Store


def routes(store: Store) -> APIRouter:
    router = APIRouter()

    # The routes the service is busiest with answer JSON directly (the model only documents it):
    # FastAPI would validate a returned dict first, in a second trip through the thread pool,
    # which cost more than the validation itself. The JSON is the same.
    @router.post("/v1/projects/{project}/clusters", status_code=202, tags=["clusters"], response_model=dict)
    def create_cluster(project: str, body: ClusterIn, who: Caller = Depends(caller)) -> JSON:
        """Places the cluster or queues it; poll GET .../clusters/{name} until state is ready."""
        return JSON(resources.create_cluster(store, who, project, body.name, body.gpus, body.gpu_type,
                                                     body.max_switches, body.require_health, body.priority), 202)

    # A project's list is hundreds of clusters.
    @router.get("/v1/projects/{project}/clusters", tags=["clusters"], response_model=list[dict])
    def list_clusters(project: str, who: Caller = Depends(caller)) -> JSON:
        return JSON(resources.list_clusters(store, who, project))

    @router.get("/v1/projects/{project}/clusters/{name}", tags=["clusters"], response_model=dict)
    def show_cluster(project: str, name: str, who: Caller = Depends(caller)) -> JSON:
        return JSON(resources.show_cluster(store, who, project, name))

    @router.delete("/v1/projects/{project}/clusters/{name}", tags=["clusters"], response_model=dict)
    def delete_cluster(project: str, name: str, force: bool = False, who: Caller = Depends(caller)) -> JSON:
        return JSON(resources.delete_cluster(store, who, project, name, force))

    @router.get("/v1/projects/{project}/quota", tags=["quota"], response_model=dict)
    def show_quota(project: str, who: Caller = Depends(caller)) -> JSON:
        with store.reading() as s:
            return JSON(resources.quota_view(s, tenancy.visible_project(s, who, project)))

    @router.put("/v1/projects/{project}/quota", tags=["quota"])
    def set_quota(project: str, body: QuotaIn, who: Caller = Depends(caller)) -> dict:
        tenancy.require_operator(who)
        with store.session() as s:
            p = tenancy.visible_project(s, who, project)
            resources.set_quota(s, p, body.gpu_type, body.max_gpus, body.gpu_hours, body.max_priority)
        resources.reconcile(store)  # after the commit: what the new quota admits goes to the fleet now
        with store.reading() as s:
            return resources.quota_view(s, tenancy.visible_project(s, who, project))

    return router
