"""Why a cluster or a job waits, as data (who preempted it, or its hold) instead of words, so that
the service names the clusters in it its own way; job ids never given out twice on SQLite.

Revision ID: 0004_causes
Revises: 0003_job_command
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_causes"
down_revision = "0003_job_command"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("cause", sa.JSON))
    # AUTOINCREMENT (SQLite keeps the highest id ever given out, so a job whose row went is never
    # followed by another of its id); recreating the table is how SQLite changes it, and a no-op elsewhere.
    recreate = "always" if op.get_bind().dialect.name == "sqlite" else "auto"
    with op.batch_alter_table("jobs", recreate=recreate, table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.add_column(sa.Column("cause", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cause")
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("cause")
