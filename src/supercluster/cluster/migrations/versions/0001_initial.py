"""The fleet schema as it was before Alembic (the hand-written schema_version 1).

Revision ID: 0001_initial
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("backend", sa.String(16), nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "nodes",
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
    op.create_table(
        "clusters",
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
    op.create_table(
        "allocations",
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("node_name", sa.String(128), sa.ForeignKey("nodes.name"), primary_key=True),
        sa.Column("gpus", sa.Integer, nullable=False),
    )
    op.create_index("ix_allocations_node_name", "allocations", ["node_name"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("cluster_name", sa.String(64), nullable=False),
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
    op.create_index("ix_jobs_cluster_name", "jobs", ["cluster_name"])
    op.create_table(
        "health_results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("node_name", sa.String(128), nullable=False),
        sa.Column("check_name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("unit", sa.String(32)),
        sa.Column("threshold", sa.Float),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("measured_at", sa.Float, nullable=False),
    )
    op.create_index("ix_health_results_node_name", "health_results", ["node_name"])
