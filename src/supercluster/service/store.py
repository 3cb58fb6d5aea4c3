"""The service's database: the fleet's (same URL, so a cluster and its tenant commit side by side)
plus the service tables, migrated with Alembic to the newest revision on open."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.orm import Session

from supercluster.cluster.state import Database

VERSION_TABLE = "svc_alembic_version"  # apart from the fleet's schema_version: two schemas, two histories
MIGRATIONS = Path(__file__).parent / "migrations"


def migrate(db: Database) -> str:
    """Upgrades the service tables to the newest revision; returns it."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


class Store:
    """The fleet database and the service tables in it."""

    def __init__(self, url: str | None = None):
        self.fleet = Database(url)
        self.url = self.fleet.url
        self.revision = migrate(self.fleet)
        # The fleet's SQLite engine takes the write lock at every BEGIN (placement must never act
        # on a stale read). A read-only session needs no such lock: its own engine lets readers,
        # such as the token lookup every request makes, run beside each other.
        self._read_engine = self.fleet.engine
        if self.fleet.engine.dialect.name == "sqlite":
            self._read_engine = sa.create_engine(self.url, connect_args={"timeout": 60}, poolclass=sa.pool.NullPool)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction on the service tables (never held across a call into `cluster`,
        which opens its own: on SQLite two would wait on each other's write lock)."""
        with self.fleet.transaction(lock=False) as s:
            yield s

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only (no write lock on SQLite); anything it changes is rolled back."""
        with Session(self._read_engine) as s:
            try:
                yield s
            finally:
                s.rollback()

    def dispose(self) -> None:
        if self._read_engine is not self.fleet.engine:
            self._read_engine.dispose()
        self.fleet.dispose()
