"""Jobs that run a command of their own instead of training (serving jobs).

Revision ID: 0003_job_command
Revises: 0002_tenancy
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_job_command"
down_revision = "0002_tenancy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("command", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("command")
