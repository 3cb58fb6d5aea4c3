"""One cluster state, the fleet's: the service's copy of it goes (it went stale when the fleet
placed a queued cluster). A service cluster waits while the fleet has none of its name.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("svc_clusters") as batch:
        batch.drop_column("state")


def downgrade() -> None:
    with op.batch_alter_table("svc_clusters") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="waiting"))
    # The copy, taken from the fleet once more.
    op.execute("UPDATE svc_clusters SET state = (SELECT clusters.state FROM clusters WHERE clusters.name = svc_clusters.fleet_name) "
               "WHERE fleet_name IN (SELECT name FROM clusters)")
