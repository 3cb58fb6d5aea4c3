"""Usage: GPU-seconds from allocation intervals, clipped to a period, grouped and priced."""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.service import prices
from supercluster.service.models import Org, Project, UsageInterval, User

GROUPS = ("org", "project", "user")
COLUMNS = ("org", "project", "user", "gpu_type", "gpu_seconds", "gpu_hours", "usd_per_gpu_hour", "cost_usd")


def gpu_seconds(s: Session, project_id: int, gpu_type: str, at: float | None = None) -> float:
    """GPU-seconds a project has held of one type, up to `at` (default now)."""
    at = time.time() if at is None else at
    end = sa.func.coalesce(UsageInterval.end_at, at)
    total = s.scalar(sa.select(sa.func.coalesce(sa.func.sum(UsageInterval.gpus * (end - UsageInterval.start_at)), 0.0))
                     .where(UsageInterval.project_id == project_id, UsageInterval.gpu_type == gpu_type))
    return float(total)


def report(s: Session, *, by: str = "project", since: float | None = None, until: float | None = None,
           project_ids: list[int] | None = None) -> list[dict]:
    """Usage rows grouped by `by` (org, project or user; finer keys show as None) and GPU type."""
    until = time.time() if until is None else until
    since = 0.0 if since is None else since
    query = (sa.select(UsageInterval, Project.name, Org.name, User.name)
             .join(Project, Project.id == UsageInterval.project_id).join(Org, Org.id == Project.org_id)
             .join(User, User.id == UsageInterval.user_id)
             .where(UsageInterval.start_at < until, sa.or_(UsageInterval.end_at.is_(None), UsageInterval.end_at > since)))
    if project_ids is not None:
        query = query.where(UsageInterval.project_id.in_(project_ids))
    totals: dict[tuple, float] = defaultdict(float)
    for interval, project, org, user in s.execute(query):
        start, end = max(interval.start_at, since), min(interval.end_at or until, until)
        key = (org, project if by in ("project", "user") else None, user if by == "user" else None, interval.gpu_type)
        totals[key] += interval.gpus * max(0.0, end - start)
    rows = []
    for (org, project, user, gpu_type), seconds in sorted(totals.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        price = prices.per_gpu_hour(gpu_type)
        rows.append({"org": org, "project": project, "user": user, "gpu_type": gpu_type, "gpu_seconds": round(seconds, 3),
                     "gpu_hours": round(seconds / 3600, 6), "usd_per_gpu_hour": price,
                     "cost_usd": None if price is None else round(seconds / 3600 * price, 4)})
    return rows


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
