"""Versioned schema migrations for the fleet database.

Each migration is a function of a connection, applied in order inside one transaction and
recorded in `schema_version`. Migrations define their own tables (frozen here as they were at
that version) instead of reading the ORM models, so that a later change to a model never
rewrites history; `tests/test_cluster_state.py` checks the models still match the result.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from supercluster.errors import UserError


def _v1_initial(conn: sa.Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "fleet", md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    sa.Table(
        "nodes", md,
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("gpu_type", sa.String(64), nullable=False),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("leaf", sa.String(128), nullable=False),
        sa.Column("pod", sa.String(128), nullable=False),
        sa.Column("address", sa.String(256)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("last_health_status", sa.String(16)),
        sa.Column("last_health_at", sa.Float),
    )
    sa.Table(
        "clusters", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("gpu_type", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("max_switches", sa.Integer),
        sa.Column("require_health", sa.Boolean, nullable=False),
        sa.Column("health_max_age_s", sa.Float, nullable=False),
        sa.Column("bypassed", sa.Integer, nullable=False),
        sa.Column("leaves", sa.Integer),
        sa.Column("pods", sa.Integer),
        sa.Column("lower_bound", sa.Integer),
        sa.Column("backend_ref", sa.String(128)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("placed_at", sa.Float),
    )
    sa.Table(
        "allocations", md,
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("node_name", sa.String(128), sa.ForeignKey("nodes.name"), primary_key=True, index=True),
        sa.Column("gpus", sa.Integer, nullable=False),
    )
    sa.Table(
        "jobs", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("cluster_name", sa.String(64), nullable=False, index=True),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("overrides", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("job_dir", sa.Text, nullable=False),
        sa.Column("backend_ref", sa.String(128)),
        sa.Column("restarts", sa.Integer, nullable=False),
        sa.Column("max_restarts", sa.Integer, nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("detail", sa.Text),
        sa.Column("submitted_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
    )
    sa.Table(
        "health_results", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("node_name", sa.String(128), nullable=False, index=True),
        sa.Column("check_name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("unit", sa.String(32)),
        sa.Column("threshold", sa.Float),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("measured_at", sa.Float, nullable=False),
    )
    md.create_all(conn)


# Append only: position i (1-based) is schema version i.
MIGRATIONS = [_v1_initial]
LATEST = len(MIGRATIONS)


def current_version(conn: sa.Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return conn.execute(sa.text("SELECT max(version) FROM schema_version")).scalar() or 0


def upgrade(engine: sa.Engine) -> int:
    """Brings the database to the latest version; returns the version it was at before."""
    with engine.begin() as conn:  # one transaction: a failed migration leaves nothing behind
        if engine.dialect.name == "postgresql":
            # Two processes opening a fresh database at once must not both run migration 1.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at FLOAT)"))
        before = current_version(conn)
        if before > LATEST:
            raise UserError(
                f"The fleet database is at schema version {before}, newer than this supercluster ({LATEST}); upgrade supercluster."
            )
        for version in range(before + 1, LATEST + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(
                sa.text("INSERT INTO schema_version (version, applied_at) VALUES (:v, :t)"),
                {"v": version, "t": time.time()},
            )
    return before
