"""The service's database: the fleet's (same URL, so a cluster and its tenant commit side by side)
plus the service tables, migrated with Alembic to the newest revision on open."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

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

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction on the service tables (never held across a call into `cluster`,
        which opens its own: on SQLite two would wait on each other's write lock)."""
        with self.fleet.transaction(lock=False) as s:
            yield s

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only (no write lock on SQLite: readers, such as the token lookup every
        request makes, run beside each other and beside a writer); anything it changes is rolled back."""
        with self.fleet.reading() as s:
            yield s

    def dispose(self) -> None:
        self.fleet.dispose()
