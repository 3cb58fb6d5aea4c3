"""Organizations, projects, users, tokens, the audit log and `whoami`: who may do what."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query

from supercluster.service import tenancy
from supercluster.service.auth import Caller, CallerCache
from supercluster.service.deps import caller
from supercluster.service.models import Audit
from supercluster.service.routes import JSON
from supercluster.service.schemas import OrgIn, ProjectIn, TokenIn, UserIn
from supercluster.service.store import Store


def routes(store: Store, callers: CallerCache) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/orgs", status_code=201, tags=["tenancy"])
    def create_org(body: OrgIn, who: Caller = Depends(caller)) -> dict:
        with store.session() as s:
            return tenancy.create_org(s, who, body.name)

    @router.get("/v1/orgs", tags=["tenancy"], response_model=list[dict])
    def list_orgs(who: Caller = Depends(caller)) -> JSON:  # JSON directly, as the busiest routes (routes/clusters.py)
        with store.reading() as s:
            return JSON(tenancy.list_orgs(s, who))

    @router.get("/v1/orgs/{org}", tags=["tenancy"])
    def show_org(org: str, who: Caller = Depends(caller)) -> dict:
        with store.reading() as s:
            return tenancy.org_dict(tenancy.visible_org(s, who, org))

    @router.post("/v1/orgs/{org}/projects", status_code=201, tags=["tenancy"])
    def create_project(org: str, body: ProjectIn, who: Caller = Depends(caller)) -> dict:
        with store.session() as s:
            return tenancy.create_project(s, who, org, body.name)

    @router.get("/v1/orgs/{org}/projects", tags=["tenancy"])
    def list_projects(org: str, who: Caller = Depends(caller)) -> list[dict]:
        with store.reading() as s:
            return tenancy.list_projects(s, who, org)

    @router.post("/v1/users", status_code=201, tags=["tenancy"])
    def create_user(body: UserIn, who: Caller = Depends(caller)) -> dict:
        with store.session() as s:
            return tenancy.create_user(s, who, body.name, body.org)

    @router.get("/v1/users", tags=["tenancy"])
    def list_users(who: Caller = Depends(caller)) -> list[dict]:
        with store.reading() as s:
            return tenancy.list_users(s, who)

    @router.post("/v1/tokens", status_code=201, tags=["tenancy"])
    def create_token(body: TokenIn, who: Caller = Depends(caller)) -> dict:
        """A new token; its secret is in this answer only (it is stored hashed)."""
        with store.session() as s:
            return tenancy.create_token(s, who, body.user, body.project, body.role, body.days)

    @router.get("/v1/tokens", tags=["tenancy"])
    def list_tokens(who: Caller = Depends(caller)) -> list[dict]:
        with store.reading() as s:
            return tenancy.list_tokens(s, who)

    @router.delete("/v1/tokens/{token_id}", tags=["tenancy"])
    def revoke_token(token_id: int = Path(ge=1, le=2**31 - 1), who: Caller = Depends(caller)) -> dict:
        with store.session() as s:
            revoked = tenancy.revoke_token(s, who, token_id)
        callers.forget()  # after the commit: a request in between would keep it for another ttl
        return revoked

    @router.get("/v1/audit", tags=["tenancy"])
    def audit(limit: int = Query(100, ge=1, le=10_000), who: Caller = Depends(caller)) -> list[dict]:
        tenancy.require(who, "admin")
        with store.reading() as s:
            query = sa.select(Audit).order_by(Audit.id.desc()).limit(limit)
            if not who.is_operator:
                query = query.where(Audit.project_id == who.project_id)
            return [{"id": a.id, "at": a.at, "user_id": a.user_id, "token_id": a.token_id, "method": a.method,
                     "path": a.path, "status": a.status, "client": a.client} for a in s.scalars(query)]

    @router.get("/v1/whoami", tags=["tenancy"])
    def whoami(who: Caller = Depends(caller)) -> dict:
        return {"user": who.user, "role": who.role, "project": who.project, "operator": who.is_operator}

    return router
