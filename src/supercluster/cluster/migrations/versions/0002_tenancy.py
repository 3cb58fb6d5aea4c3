"""Tenancy on the fleet: owner tags, priorities and preemption, allocation intervals for usage.

Revision ID: 0002_tenancy
Revises: 0001_initial
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_tenancy"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "allocation_intervals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("cluster_id", sa.Integer, nullable=False),
        sa.Column("cluster_name", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(128)),
        sa.Column("gpu_type", sa.String(64), nullable=False),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("nodes", sa.JSON, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("end_reason", sa.String(32)),
    )
    for column in ("cluster_id", "owner", "started_at", "ended_at"):
        op.create_index(f"ix_allocation_intervals_{column}", "allocation_intervals", [column])
    # Existing rows get the defaults: no owner, priority 0, never preempted.
    op.add_column("clusters", sa.Column("owner", sa.String(128)))
    op.add_column("clusters", sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    op.add_column("clusters", sa.Column("detail", sa.Text))
    op.create_index("ix_clusters_owner", "clusters", ["owner"])
    op.add_column("jobs", sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"))
