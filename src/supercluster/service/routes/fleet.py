"""The fleet as tenants may see it, the operator's node drain and undrain, and the planner."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from supercluster.service import resources, tenancy
from supercluster.service.auth import Caller, ServiceError
from supercluster.service.deps import caller
from supercluster.service.schemas import DrainIn, PlanIn
from supercluster.service.store import Store


def routes(store: Store) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/fleet", tags=["fleet"])
    def fleet(who: Caller = Depends(caller)) -> dict:
        """Nodes by pod and leaf switch; clusters on them are named only where they are the caller's."""
        from supercluster.cluster.fleet import summary

        info = summary(store.fleet)
        with store.reading() as s:
            mine = resources.fleet_names(s, who)
        for node in info["node_list"]:
            node["clusters"] = sorted(mine[c] for c in node["clusters"] if c in mine)
        return info

    @router.get("/v1/fleet/health", tags=["fleet"])
    def fleet_health(limit: int = Query(100, ge=1, le=10_000), who: Caller = Depends(caller)) -> list[dict]:
        """The latest health check results of the fleet's nodes, newest first."""
        from supercluster.cluster.fleet import health_history

        return health_history(store.fleet, limit=limit)

    def _operator_node(who: Caller, name: str) -> None:
        from supercluster.cluster.fleet import has_node

        tenancy.require_operator(who)
        if not has_node(store.fleet, name):
            raise ServiceError(404, f"No node {name!r} in the fleet; GET /v1/fleet lists them.")

    @router.post("/v1/fleet/nodes/{name}/drain", tags=["fleet"])
    def drain_node(name: str, body: DrainIn, who: Caller = Depends(caller)) -> dict:
        """Take a node out of placement (the operator's); clusters on it keep it until deleted."""
        from supercluster.cluster.fleet import drain_node

        _operator_node(who, name)
        drain_node(name, body.reason, db=store.fleet)
        return {"node": name, "state": "drain", "reason": body.reason}

    @router.post("/v1/fleet/nodes/{name}/undrain", tags=["fleet"])
    def undrain_node(name: str, who: Caller = Depends(caller)) -> dict:
        """Return a drained or down node to service (the operator's); queued clusters that now fit start."""
        _operator_node(who, name)
        return {"node": name, "state": "up", "started": resources.undrain_node(store, name)}

    @router.post("/v1/plans", tags=["plans"])
    def plans(body: PlanIn, who: Caller = Depends(caller)) -> dict:
        """The planner: ranked parallel layouts for a model on `gpus` GPUs (nothing is allocated)."""
        from supercluster.plan import build_model, build_request, search

        req = build_request(build_model(body.model), body.gpus, gpu=body.gpu, seq_len=body.seq_len,
                            global_batch=body.global_batch)
        return {"plans": [e.as_dict() for e in search(req, top=body.top)]}

    return router
