"""Priorities with preemption: a cluster's priority, a project's highest allowed priority, and what a
preempted job needs to be submitted again from its checkpoint.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("svc_clusters") as batch:
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("svc_quotas") as batch:
        batch.add_column(sa.Column("max_priority", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("svc_jobs") as batch:
        batch.add_column(sa.Column("config", sa.Text, nullable=True))
        batch.add_column(sa.Column("overrides", sa.JSON, nullable=True))
        batch.add_column(sa.Column("max_restarts", sa.Integer, nullable=True))
        batch.add_column(sa.Column("run_dir", sa.Text, nullable=True))
        batch.add_column(sa.Column("preempted", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("resumed_as", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("svc_jobs") as batch:
        for name in ("resumed_as", "preempted", "run_dir", "max_restarts", "overrides", "config"):
            batch.drop_column(name)
    with op.batch_alter_table("svc_quotas") as batch:
        batch.drop_column("max_priority")
    with op.batch_alter_table("svc_clusters") as batch:
        batch.drop_column("priority")
