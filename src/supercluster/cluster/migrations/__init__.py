"""Schema migrations for the fleet database, with Alembic, run on every open.

The Alembic environment ships inside the package (`env.py`, `versions/`), found through the
package's resources, so an installed supercluster migrates its database without an
alembic.ini. Revisions define their own tables instead of reading the ORM models, so that a
later change to a model never rewrites history; `tests/test_cluster_state.py` checks that the
models still match the migrated schema.

A database made before Alembic (a `schema_version` table at version 1, whose schema is the
first revision) is adopted: stamped at that revision, then upgraded, keeping its data.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from supercluster.errors import UserError

SCRIPT_LOCATION = "supercluster.cluster:migrations"  # package:folder, resolved by Alembic at run time
LEGACY_REVISIONS = {1: "0001_initial"}  # schema_version (the hand-written versions) -> revision


def config(conn: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


def current_revision(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: sa.Engine) -> str | None:
    """Brings the database to the latest revision; returns the revision it was at before."""
    with engine.begin() as conn:  # one transaction: a failed migration leaves nothing behind
        if engine.dialect.name == "postgresql":
            # Two processes opening a fresh database at once must not both run the first revision.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
        cfg = config(conn)
        _adopt_legacy(conn, cfg)
        before = current_revision(conn)
        if before is not None and not _known(cfg, before):
            raise UserError(
                f"The fleet database is at schema revision {before!r}, newer than this supercluster ({head()!r}); upgrade supercluster."
            )
        if before != head():
            command.upgrade(cfg, "head")
    return before


def _known(cfg: Config, revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(cfg).get_revision(revision) is not None
    except CommandError:  # "Can't locate revision": one from a newer release
        return False


def _adopt_legacy(conn: sa.Connection, cfg: Config) -> None:
    inspector = sa.inspect(conn)
    if not inspector.has_table("schema_version") or inspector.has_table("alembic_version"):
        return
    version = conn.execute(sa.text("SELECT max(version) FROM schema_version")).scalar() or 0
    if version not in LEGACY_REVISIONS:
        raise UserError(f"The fleet database is at schema version {version}, which this supercluster does not know; upgrade supercluster.")
    command.stamp(cfg, LEGACY_REVISIONS[version])
    conn.execute(sa.text("DROP TABLE schema_version"))  # Alembic's alembic_version takes over
