"""Alembic's environment: always on the connection `migrations.upgrade` passes in (its transaction)."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run fleet migrations through supercluster.cluster.migrations.upgrade (it passes the connection)")
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
