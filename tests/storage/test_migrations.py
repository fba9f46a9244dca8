"""The shipped migrations: an empty database is brought to the newest schema, an up-to-date one
is left alone, and what they build is exactly what the code's tables describe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, delete, select

from core.storage.sql import SchemaOutOfDate, SQLStorage, head_revision, schema_status, upgrade
from core.storage.sql.engine import make_engine
from core.storage.sql.tables import leases, metadata, pools, upstreams
from tests.conftest import skip_or_fail
from tests.storage.scratch import POSTGRES_URL, drop_schema, make_schema, postgres_unavailable


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """An empty database: its URL, and for PostgreSQL a schema of its own."""
    if request.param == "sqlite":
        yield {"url": f"sqlite:///{tmp_path / 'empty.db'}"}
        return
    if reason := await postgres_unavailable():
        skip_or_fail(reason)
    schema = await make_schema("pgmigrate")
    try:
        yield {"url": POSTGRES_URL, "schema": schema}
    finally:
        await drop_schema(schema)


async def test_upgrade_builds_an_empty_database_then_changes_nothing(
    database: dict[str, str],
) -> None:
    before = await schema_status(**database)
    assert (before.current, before.is_current) == (None, False)
    after = await upgrade(**database)
    assert (after.current, after.is_current) == (head_revision(), True)
    again = await upgrade(**database)  # up to date: nothing to do, no error
    assert again.current == head_revision()
    assert (await schema_status(**database)).is_current


async def test_the_migrated_schema_is_what_the_tables_describe(database: dict[str, str]) -> None:
    await upgrade(**database)
    engine = make_engine(database["url"], schema=database.get("schema"))

    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection)
        return list(compare_metadata(context, metadata))

    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
    finally:
        await engine.dispose()


async def test_the_storage_refuses_a_database_without_the_schema(
    database: dict[str, str],
) -> None:
    storage = SQLStorage(database["url"], schema=database.get("schema"))
    with pytest.raises(SchemaOutOfDate, match="proxygate db upgrade"):
        await storage.open()
    await storage.close()


async def test_an_upgrade_from_the_first_schema_keeps_the_leases_and_their_ids(
    database: dict[str, str],
) -> None:
    """0002 drops the leases' foreign key (SQLite copies the table to do so): the leases stay,
    and an id once handed out is never handed out again, not even the last one, released."""
    await upgrade(**database, revision="0001")
    engine = make_engine(database["url"], schema=database.get("schema"))
    upstream = {
        "id": "u1", "pool": "p", "scheme": "http", "host": "127.0.0.1", "port": 8080,
        "weight": 1.0, "lim": 10, "status": "active", "failure_streak": 0, "times_ejected": 0,
        "window_ok": 0, "window_failed": 0, "previous_ok": 0, "previous_failed": 0,
    }  # fmt: skip

    def lease(key: int) -> dict[str, object]:
        return {
            "upstream_key": key, "pool": "p", "consumer": "c", "bound": False,
            "acquired_at": 1.0, "holder": "h", "uses": 1,
        }  # fmt: skip

    try:
        async with engine.begin() as conn:
            pool = {"name": "p", "selector": "round_robin", "settings": "{}"}
            await conn.execute(pools.insert().values(pool))
            inserted = await conn.execute(
                upstreams.insert().values(upstream).returning(upstreams.c.key)
            )
            key = inserted.scalar_one()
            for _ in range(3):
                await conn.execute(leases.insert().values(lease(key)))
            await conn.execute(delete(leases).where(leases.c.id == 3))
        await upgrade(**database)
        async with engine.begin() as conn:
            await conn.execute(leases.insert().values(lease(key)))
            ids = (await conn.execute(select(leases.c.id).order_by(leases.c.id))).scalars().all()
    finally:
        await engine.dispose()
    assert ids == [1, 2, 4]
