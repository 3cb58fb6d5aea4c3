"""Alembic environment: migrates the connection `store.migrate` hands over (no alembic.ini needed)."""

from alembic import context

from supercluster.service.models import ServiceBase
from supercluster.service.store import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=ServiceBase.metadata, version_table=VERSION_TABLE,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
