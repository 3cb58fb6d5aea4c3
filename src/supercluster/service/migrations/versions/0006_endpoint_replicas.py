"""Endpoint replicas: an endpoint is several model servers behind the service's router, between a
minimum and a maximum; each answered call says which replica answered.

The endpoint's one server (its job and URL) becomes replica 0.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _drop(table: str, *columns: str) -> None:
    """ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+ and PostgreSQL): a batch copy of svc_endpoints
    would drop the table that calls and replicas reference, which SQLite's foreign keys refuse."""
    for column in columns:
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")


def upgrade() -> None:
    op.create_table(
        "svc_endpoint_replicas",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("endpoint_id", sa.Integer, sa.ForeignKey("svc_endpoints.id"), nullable=False, index=True),
        sa.Column("index", sa.Integer, nullable=False),
        sa.Column("job_id", sa.Integer),
        sa.Column("url", sa.String(256)),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
    )
    # Each endpoint's server, as its replica 0.
    op.execute("INSERT INTO svc_endpoint_replicas (endpoint_id, \"index\", job_id, url, port, state, detail, started_at) "
               "SELECT id, 0, job_id, url, 0, state, detail, created_at FROM svc_endpoints")
    _drop("svc_endpoints", "job_id", "url")
    op.add_column("svc_endpoints", sa.Column("max_running", sa.Integer, nullable=False, server_default="32"))
    op.add_column("svc_endpoints", sa.Column("quantize", sa.String(16), nullable=False, server_default="none"))
    op.add_column("svc_endpoints", sa.Column("min_replicas", sa.Integer, nullable=False, server_default="1"))
    op.add_column("svc_endpoints", sa.Column("max_replicas", sa.Integer, nullable=False, server_default="1"))
    op.add_column("svc_endpoints", sa.Column("replicas", sa.Integer, nullable=False, server_default="1"))
    op.add_column("svc_endpoints", sa.Column("scaled_at", sa.Float))
    op.add_column("svc_endpoint_calls", sa.Column("replica", sa.Integer))


def downgrade() -> None:
    _drop("svc_endpoint_calls", "replica")
    _drop("svc_endpoints", "scaled_at", "replicas", "max_replicas", "min_replicas", "quantize", "max_running")
    op.add_column("svc_endpoints", sa.Column("job_id", sa.Integer))
    op.add_column("svc_endpoints", sa.Column("url", sa.String(256), nullable=False, server_default=""))
    op.execute("UPDATE svc_endpoints SET job_id = (SELECT r.job_id FROM svc_endpoint_replicas r WHERE r.endpoint_id = "
               "svc_endpoints.id AND r.\"index\" = 0 ORDER BY r.id DESC LIMIT 1), url = COALESCE((SELECT r.url FROM "
               "svc_endpoint_replicas r WHERE r.endpoint_id = svc_endpoints.id AND r.\"index\" = 0 ORDER BY r.id DESC "
               "LIMIT 1), '')")
    op.drop_table("svc_endpoint_replicas")
