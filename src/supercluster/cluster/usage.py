"""Usage at the source: GPU-seconds summed from the intervals during which clusters held nodes.

Placement opens an interval (`open_interval`) and every release closes it (`close_intervals`:
delete, preemption, a node swap, which opens the next one on the new nodes). An interval
still open counts up to now. `usage` sums any period, clipping intervals to it, so a bill
for a month is the same query as one for an hour.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster.state import AllocationInterval, Cluster, Database, now, open_db
from supercluster.errors import UserError, closest

GROUP_BY = {"owner": AllocationInterval.owner, "gpu_type": AllocationInterval.gpu_type,
            "cluster": AllocationInterval.cluster_name}


def open_interval(s: Session, cluster: Cluster, nodes: list[str], gpus: int, at: float) -> None:
    s.add(AllocationInterval(cluster_id=cluster.id, cluster_name=cluster.name, owner=cluster.owner,
                             gpu_type=cluster.gpu_type, gpus=gpus, nodes=list(nodes), started_at=at))


_CLOSE = (sa.update(AllocationInterval)  # built once: every delete runs it
          .where(AllocationInterval.cluster_id == sa.bindparam("cluster"), AllocationInterval.ended_at.is_(None))
          .values(ended_at=sa.bindparam("at"), end_reason=sa.bindparam("reason"))
          .execution_options(synchronize_session=False))


def close_intervals(s: Session, cluster_id: int, at: float, reason: str) -> None:
    s.execute(_CLOSE, {"cluster": cluster_id, "at": at, "reason": reason})


def usage(
    db: Database | str | None = None,
    since: float | None = None,
    until: float | None = None,
    group_by: tuple[str, ...] | list[str] = ("owner", "gpu_type"),
) -> list[dict]:
    """GPU-seconds per group over [since, until) (defaults: all time, now), largest first.

    Each row has the group_by keys plus `gpu_seconds` and `gpu_hours`; `owner` is None for
    clusters created without one.
    """
    with open_db(db).transaction(lock=False) as s:
        return usage_in(s, since, until, group_by)


_queries: dict[tuple, sa.Select] = {}  # built once per shape: building one cost several times running it


def _usage_query(group_by: tuple[str, ...], by_owner: bool, open_counts: bool) -> sa.Select:
    """GPU-seconds per group in [:since, :until], an open interval running to :open_end (now, or
    :until if earlier); by_owner: only owners LIKE :owner_like; open_counts: whether an open
    interval can fall in the period at all (now is after its start)."""
    key = (group_by, by_owner, open_counts)
    query = _queries.get(key)
    if query is None:
        until, since = sa.bindparam("until", type_=sa.Float), sa.bindparam("since", type_=sa.Float)
        # An open interval runs to now; every interval is clipped to [since, until].
        end = sa.func.coalesce(AllocationInterval.ended_at, sa.bindparam("open_end", type_=sa.Float))
        end = sa.case((end > until, until), else_=end)
        start = sa.case((AllocationInterval.started_at < since, since), else_=AllocationInterval.started_at)
        seconds = sa.func.sum(AllocationInterval.gpus * (end - start))
        columns = [GROUP_BY[k] for k in group_by]
        query = (
            sa.select(*columns, seconds)
            .where(AllocationInterval.started_at < until,
                   sa.or_(AllocationInterval.ended_at > since, sa.and_(AllocationInterval.ended_at.is_(None), open_counts)))
            .group_by(*columns)
        )
        if by_owner:
            query = query.where(AllocationInterval.owner.like(sa.bindparam("owner_like", type_=sa.String)))
        _queries[key] = query
    return query


def usage_in(
    s: Session,
    since: float | None = None,
    until: float | None = None,
    group_by: tuple[str, ...] | list[str] = ("owner", "gpu_type"),
    owner_like: str | None = None,
) -> list[dict]:
    """`usage` inside a session the caller holds (the service reads it beside its own tables);
    owner_like: only owners matching this SQL LIKE pattern (the service's one project)."""
    for key in group_by:
        if key not in GROUP_BY:
            raise UserError(f"Cannot group usage by {key!r}{closest(key, GROUP_BY)}; use {', '.join(GROUP_BY)}.")
    at = now()
    until = at if until is None else until
    since = 0.0 if since is None else since
    if until < since:
        raise UserError(f"The usage period ends ({until}) before it starts ({since}); swap since and until.")
    query = _usage_query(tuple(group_by), owner_like is not None, at > since)
    params = {"open_end": min(at, until), "until": until, "since": since}
    if owner_like is not None:
        params["owner_like"] = owner_like
    rows = [{**dict(zip(group_by, row[:-1])), "gpu_seconds": float(row[-1] or 0.0)} for row in s.execute(query, params)]
    for row in rows:
        row["gpu_hours"] = row["gpu_seconds"] / 3600.0
    return sorted(rows, key=lambda r: (-r["gpu_seconds"], *(str(r[k]) for k in group_by)))
