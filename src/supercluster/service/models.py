"""The service's tables, beside the fleet's in the same database (names prefixed `svc_`).

Times are float seconds since the epoch, as in the fleet's tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("viewer", "member", "admin")  # each may do what the ones before it may
# A service cluster has no state of its own: it waits (for its quota) while the fleet has no cluster
# of its `fleet_name`, and is in the fleet's state after (`resources.cluster_state`).


class ServiceBase(DeclarativeBase):
    pass


class Org(ServiceBase):
    __tablename__ = "svc_orgs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[float]


class Project(ServiceBase):
    __tablename__ = "svc_projects"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_orgs.id"), index=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)  # global: it names the project in URLs
    created_at: Mapped[float]


class User(ServiceBase):
    __tablename__ = "svc_users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    org_id: Mapped[int | None] = mapped_column(sa.ForeignKey("svc_orgs.id"), index=True)  # None: the operator
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    is_operator: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[float]


class Token(ServiceBase):
    __tablename__ = "svc_tokens"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_users.id"), index=True)
    project_id: Mapped[int | None] = mapped_column(sa.ForeignKey("svc_projects.id"), index=True)  # None: operator
    role: Mapped[str] = mapped_column(sa.String(16))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)  # sha256 hex; the token itself is never stored
    prefix: Mapped[str] = mapped_column(sa.String(16))  # shown in listings so a user can tell tokens apart
    expires_at: Mapped[float | None]
    revoked_at: Mapped[float | None]
    created_at: Mapped[float]


class Quota(ServiceBase):
    __tablename__ = "svc_quotas"
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_projects.id"), primary_key=True)
    gpu_type: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    max_gpus: Mapped[int | None]  # concurrent GPUs; past it, requests wait
    gpu_hours: Mapped[float | None]  # budget; past it, requests are refused
    max_priority: Mapped[int] = mapped_column(default=0, server_default="0")  # highest priority its requests may ask


class ServiceCluster(ServiceBase):
    """A project's cluster: its name in the project, and the fleet cluster that holds it."""

    __tablename__ = "svc_clusters"
    __table_args__ = (sa.UniqueConstraint("project_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_projects.id"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_users.id"))
    name: Mapped[str] = mapped_column(sa.String(48))
    fleet_name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    gpus: Mapped[int]
    gpu_type: Mapped[str] = mapped_column(sa.String(64))
    max_switches: Mapped[int | None]
    require_health: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str | None] = mapped_column(sa.Text)  # why the quota holds it back, while the fleet has none
    priority: Mapped[int] = mapped_column(default=0, server_default="0")  # a higher one may preempt it
    created_at: Mapped[float]


class ServiceJob(ServiceBase):
    __tablename__ = "svc_jobs"
    job_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # the fleet's job id
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_projects.id"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_users.id"))
    cluster: Mapped[str] = mapped_column(sa.String(48))  # the cluster's name in the project
    created_at: Mapped[float]


class Audit(ServiceBase):
    __tablename__ = "svc_audit"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(index=True)
    user_id: Mapped[int | None]
    token_id: Mapped[int | None]
    project_id: Mapped[int | None] = mapped_column(index=True)
    method: Mapped[str] = mapped_column(sa.String(8))
    path: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[int]
    client: Mapped[str | None] = mapped_column(sa.String(64))


ENDPOINT_STATES = ("starting", "ready", "failed", "stopping", "stopped")


class Endpoint(ServiceBase):
    """A project's served model: `supercluster serve` replicas (`EndpointReplica`) on one of its
    clusters, behind the service's router; between `min_replicas` and `max_replicas` of them,
    `replicas` wanted now (the scaler moves it)."""

    __tablename__ = "svc_endpoints"
    __table_args__ = (sa.UniqueConstraint("project_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_projects.id"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_users.id"))
    name: Mapped[str] = mapped_column(sa.String(48))
    cluster: Mapped[str] = mapped_column(sa.String(48))  # the cluster's name in the project
    run_dir: Mapped[str] = mapped_column(sa.Text)
    secret: Mapped[str] = mapped_column(sa.String(64))  # the servers' API key: only the service calls them
    max_running: Mapped[int] = mapped_column(default=32, server_default="32")
    quantize: Mapped[str] = mapped_column(sa.String(16), default="none", server_default="none")
    min_replicas: Mapped[int] = mapped_column(default=1, server_default="1")
    max_replicas: Mapped[int] = mapped_column(default=1, server_default="1")
    replicas: Mapped[int] = mapped_column(default=1, server_default="1")  # wanted now, within [min, max]
    scaled_at: Mapped[float | None]  # the last scale out or in: the cooldown counts from it
    state: Mapped[str] = mapped_column(sa.String(16))  # see ENDPOINT_STATES
    detail: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[float]


REPLICA_STATES = ("starting", "ready", "failed", "stopped")


class EndpointReplica(ServiceBase):
    """One model server of an endpoint: a serving job of the fleet, answering at `url` once ready.
    A replacement takes the index of the replica it replaces (the router's affinity is by index)."""

    __tablename__ = "svc_endpoint_replicas"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    endpoint_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_endpoints.id"), index=True)
    index: Mapped[int]
    job_id: Mapped[int | None]  # the fleet's serving job (the server's reference in the backend)
    url: Mapped[str | None] = mapped_column(sa.String(256))  # where it listens: its node's address, once known
    port: Mapped[int]
    state: Mapped[str] = mapped_column(sa.String(16))  # see REPLICA_STATES
    detail: Mapped[str | None] = mapped_column(sa.Text)
    started_at: Mapped[float]
    ended_at: Mapped[float | None]


class EndpointCall(ServiceBase):
    """One answered request through an endpoint, for usage: who asked, when, how many tokens."""

    __tablename__ = "svc_endpoint_calls"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    endpoint_id: Mapped[int] = mapped_column(sa.ForeignKey("svc_endpoints.id"), index=True)
    replica: Mapped[int | None]  # the index of the replica that answered
    user_id: Mapped[int | None]
    at: Mapped[float] = mapped_column(index=True)
    prompt_tokens: Mapped[int]
    completion_tokens: Mapped[int]
