"""Preemption and usage move to the fleet: a preempted job restarts in place there, and usage is
read from the fleet's allocation intervals; the service's copies of both go.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_JOB_COLUMNS = ("resumed_as", "preempted", "run_dir", "max_restarts", "overrides", "config")


def upgrade() -> None:
    with op.batch_alter_table("svc_jobs") as batch:
        for name in _JOB_COLUMNS:
            batch.drop_column(name)
    op.drop_table("svc_usage")


def downgrade() -> None:
    op.create_table(
        "svc_usage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("svc_projects.id"), nullable=False, index=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("svc_users.id"), nullable=False),
        sa.Column("cluster", sa.String(48), nullable=False),
        sa.Column("gpu_type", sa.String(64), nullable=False),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("start_at", sa.Float, nullable=False),
        sa.Column("end_at", sa.Float, nullable=True),
    )
    with op.batch_alter_table("svc_jobs") as batch:
        batch.add_column(sa.Column("config", sa.Text, nullable=True))
        batch.add_column(sa.Column("overrides", sa.JSON, nullable=True))
        batch.add_column(sa.Column("max_restarts", sa.Integer, nullable=True))
        batch.add_column(sa.Column("run_dir", sa.Text, nullable=True))
        batch.add_column(sa.Column("preempted", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("resumed_as", sa.Integer, nullable=True))
