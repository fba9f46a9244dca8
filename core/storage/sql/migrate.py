"""The SQL storage's schema migrations (Alembic, shipped in `migrations/`), applied from code.

`upgrade(url)` brings a database to the newest schema (what `proxygate db upgrade` runs);
`schema_is_current(url)` tells whether it is there (what `proxygate run` checks before it
starts). On PostgreSQL, upgrades from several processes at once (replicas starting together)
take turns on an advisory lock, and the second finds nothing left to do.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection

from core.storage.sql.engine import make_engine

__all__ = [
    "MIGRATIONS",
    "SchemaStatus",
    "head_revision",
    "schema_is_current",
    "schema_status",
    "upgrade",
    "upgrade_connection",
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: pg_advisory_xact_lock key that serialises migrations ("proxygate" in ASCII, truncated).
_MIGRATION_LOCK = 0x70726F7879676174


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema revision this code ships."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


class SchemaStatus:
    """Where a database's schema stands against the code's."""

    __slots__ = ("current", "head")

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head

    @property
    def is_current(self) -> bool:
        return self.current == self.head

    def __repr__(self) -> str:
        return f"SchemaStatus(current={self.current!r}, head={self.head!r})"


def _upgrade_sync(connection: Connection, revision: str = "head") -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
    command.upgrade(_config(connection), revision)


def _current_sync(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade_connection(conn: AsyncConnection, revision: str = "head") -> None:
    """Apply every pending migration up to `revision` on `conn`, inside its transaction."""
    await conn.run_sync(_upgrade_sync, revision)


async def upgrade(
    url: str | URL, *, schema: str | None = None, revision: str = "head"
) -> SchemaStatus:
    """Bring the database at `url` to the newest schema (or to `revision`); a no-op when it is
    there already.

    Returns where it stands afterwards. `schema` (PostgreSQL) puts the tables in that schema,
    which must exist.
    """
    engine = make_engine(url, schema=schema, pool_size=1, max_overflow=0)
    try:
        async with engine.begin() as conn:
            await upgrade_connection(conn, revision)
            current = await conn.run_sync(_current_sync)
    finally:
        await engine.dispose()
    return SchemaStatus(current, head_revision())


async def schema_status(url: str | URL, *, schema: str | None = None) -> SchemaStatus:
    """The database's schema revision (None when it has none yet) beside the newest."""
    engine = make_engine(url, schema=schema, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            current = await conn.run_sync(_current_sync)
    finally:
        await engine.dispose()
    return SchemaStatus(current, head_revision())


async def schema_is_current(url: str | URL, *, schema: str | None = None) -> bool:
    """True when the database at `url` has the newest schema (`proxygate db upgrade` ran)."""
    return (await schema_status(url, schema=schema)).is_current
