"""Endpoints: projects serve models from their clusters, and each answered call is counted.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "svc_endpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("svc_projects.id"), nullable=False, index=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("svc_users.id"), nullable=False),
        sa.Column("name", sa.String(48), nullable=False),
        sa.Column("cluster", sa.String(48), nullable=False),
        sa.Column("run_dir", sa.Text, nullable=False),
        sa.Column("job_id", sa.Integer),
        sa.Column("url", sa.String(256), nullable=False),
        sa.Column("secret", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("project_id", "name"),
    )
    op.create_table(
        "svc_endpoint_calls",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("endpoint_id", sa.Integer, sa.ForeignKey("svc_endpoints.id"), nullable=False, index=True),
        sa.Column("user_id", sa.Integer),
        sa.Column("at", sa.Float, nullable=False, index=True),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("svc_endpoint_calls")
    op.drop_table("svc_endpoints")
