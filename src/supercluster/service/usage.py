"""Usage and cost from the fleet's allocation intervals (`cluster.usage`), named and priced here.

The service hands every cluster to the fleet with an owner tag naming the project and the user
who asked (`owner_tag`), so the fleet's books alone say who held which GPUs when; this module
turns tags back into org, project and user names and prices GPU-hours with `prices`.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster import usage as fleet_usage
from supercluster.service import prices
from supercluster.service.models import Org, Project, User

GROUPS = ("org", "project", "user")
COLUMNS = ("org", "project", "user", "gpu_type", "gpu_seconds", "gpu_hours", "usd_per_gpu_hour", "cost_usd", "owner")
# an endpoint's calls (`endpoints.token_report`), as rows of the same CSV with the GPU columns empty
TOKEN_COLUMNS = ("endpoint", "requests", "prompt_tokens", "completion_tokens")
_TAG = re.compile(r"^p(\d+)/u(\d+)$")


def owner_tag(project_id: int, user_id: int | str) -> str:
    """The fleet owner of a service cluster (ids, not names: they never change); with user_id "%",
    a SQL LIKE pattern for the owners of a project's clusters."""
    return f"p{project_id}/u{user_id}"


def _parse(owner: str | None) -> tuple[int, int] | None:
    m = _TAG.match(owner or "")
    return (int(m[1]), int(m[2])) if m else None


def gpu_seconds_by_type(s: Session, project_id: int, at: float | None = None) -> dict[str, float]:
    """GPU-seconds a project has held, by GPU type, up to `at` (default now): one query, summed by the database."""
    # The database sums the project's intervals per user (the LIKE is a prefilter); the tag is
    # then parsed as everywhere here, so a hand-made owner that only looks alike is not counted.
    rows = fleet_usage.usage_in(s, until=at, owner_like=owner_tag(project_id, "%"))
    totals: dict[str, float] = defaultdict(float)
    for r in rows:
        if (_parse(r["owner"]) or (None,))[0] == project_id:
            totals[r["gpu_type"]] += r["gpu_seconds"]
    return totals


def gpu_seconds(s: Session, project_id: int, gpu_type: str, at: float | None = None) -> float:
    """GPU-seconds a project has held of one type, up to `at` (default now)."""
    return gpu_seconds_by_type(s, project_id, at).get(gpu_type, 0.0)


# Built once (building a statement cost more than running it): projects and orgs, all or :ids' own.
_PROJECTS, _ORGS = sa.select(Project.id, Project.org_id, Project.name), sa.select(Org.id, Org.name)
_IDS = sa.bindparam("ids", expanding=True)
_PROJECTS_OF = _PROJECTS.where(Project.id.in_(_IDS))
_ORGS_OF = _ORGS.where(Org.id.in_(sa.select(Project.org_id).where(Project.id.in_(_IDS))))


def report(s: Session, *, by: str = "project", since: float | None = None, until: float | None = None,
           project_ids: list[int] | None = None, fleet_clusters: bool = False) -> list[dict]:
    """Usage rows grouped by `by` (org, project or user; finer keys show as None) and GPU type.

    fleet_clusters: also the clusters made without the service (`cluster create` on the local
    database), by their `--owner` tag, with no org, project or user.
    """
    # Plain rows, and for a tenant's report only its own projects and their orgs: rows of other
    # projects are left out below anyway, and a tenant asks often (loading every project as an
    # object was most of that route's work).
    if project_ids is None:
        projects, orgs = {p.id: p for p in s.execute(_PROJECTS)}, dict(s.execute(_ORGS).all())
    else:
        ids = {"ids": list(project_ids)}
        projects, orgs = {p.id: p for p in s.execute(_PROJECTS_OF, ids)}, dict(s.execute(_ORGS_OF, ids).all())
    users = dict(s.execute(sa.select(User.id, User.name)).all()) if by == "user" else {}
    totals: dict[tuple, float] = defaultdict(float)
    # A tenant's report (one project) asks the database for its own intervals only, not everyone's.
    owner_like = owner_tag(project_ids[0], "%") if project_ids is not None and len(project_ids) == 1 else None
    for row in fleet_usage.usage_in(s, since=since, until=until, owner_like=owner_like):
        ids = _parse(row["owner"])
        if ids is None or ids[0] not in projects:
            if fleet_clusters and project_ids is None:  # a cluster the service did not create
                totals[(None, None, None, row["gpu_type"], row["owner"])] += row["gpu_seconds"]
            continue
        if project_ids is not None and ids[0] not in project_ids:
            continue
        p = projects[ids[0]]
        key = (orgs.get(p.org_id), p.name if by in ("project", "user") else None,
               users.get(ids[1]) if by == "user" else None, row["gpu_type"], None)
        totals[key] += row["gpu_seconds"]
    rows = []
    for (org, project, user, gpu_type, owner), seconds in sorted(totals.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        price = prices.per_gpu_hour(gpu_type)
        rows.append({"org": org, "project": project, "user": user, "gpu_type": gpu_type, "gpu_seconds": round(seconds, 3),
                     "gpu_hours": round(seconds / 3600, 6), "usd_per_gpu_hour": price,
                     "cost_usd": None if price is None else round(seconds / 3600 * price, 4), "owner": owner})
    return rows


def to_csv(rows: list[dict], tokens: list[dict] = ()) -> str:
    """GPU rows, then endpoint rows (`tokens`), each leaving the other's columns empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS + TOKEN_COLUMNS, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    writer.writerows(tokens)
    return out.getvalue()
