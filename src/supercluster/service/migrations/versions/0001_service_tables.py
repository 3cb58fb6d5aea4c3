"""Service tables: orgs, projects, users, tokens, quotas, clusters, jobs, usage, audit.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "svc_orgs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "svc_projects",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("svc_orgs.id"), nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "svc_users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("svc_orgs.id"), nullable=True, index=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("is_operator", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "svc_tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("svc_users.id"), nullable=False, index=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("svc_projects.id"), nullable=True, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "svc_quotas",
        sa.Column("project_id", sa.Integer, sa.ForeignKey("svc_projects.id"), primary_key=True),
        sa.Column("gpu_type", sa.String(64), primary_key=True),
        sa.Column("max_gpus", sa.Integer, nullable=True),
        sa.Column("gpu_hours", sa.Float, nullable=True),
    )
    op.create_table(
        "svc_clusters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("svc_projects.id"), nullable=False, index=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("svc_users.id"), nullable=False),
        sa.Column("name", sa.String(48), nullable=False),
        sa.Column("fleet_name", sa.String(64), nullable=False, unique=True),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("gpu_type", sa.String(64), nullable=False),
        sa.Column("max_switches", sa.Integer, nullable=True),
        sa.Column("require_health", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("project_id", "name"),
    )
    op.create_table(
        "svc_jobs",
        sa.Column("job_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("svc_projects.id"), nullable=False, index=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("svc_users.id"), nullable=False),
        sa.Column("cluster", sa.String(48), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
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
    op.create_table(
        "svc_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False, index=True),
        sa.Column("user_id", sa.Integer, nullable=True),
        sa.Column("token_id", sa.Integer, nullable=True),
        sa.Column("project_id", sa.Integer, nullable=True, index=True),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("client", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    for table in ("svc_audit", "svc_usage", "svc_jobs", "svc_clusters", "svc_quotas", "svc_tokens", "svc_users",
                  "svc_projects", "svc_orgs"):
        op.drop_table(table)
