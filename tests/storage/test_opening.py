"""A PostgreSQL storage whose opening fails part-way (here: its schema check is off and the
schema holds no tables, so preparing the hot statements fails) raises, keeps no connection
open, and is not taken for open afterwards: the next `open` tries again from the start."""

from __future__ import annotations

import secrets

import asyncpg
import pytest

from core.storage.sql import SQLStorage
from tests.conftest import skip_or_fail
from tests.storage.scratch import POSTGRES_URL, drop_schema, make_schema, postgres_unavailable


async def connections_named(name: str) -> int:
    connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
        )
    finally:
        await connection.close()
    assert isinstance(count, int)
    return count


async def test_an_open_that_fails_part_way_leaves_nothing_open() -> None:
    if reason := await postgres_unavailable():
        skip_or_fail(reason)
    schema = await make_schema("pgtest_open")
    name = f"proxygate_open_{secrets.token_hex(4)}"
    url = f"{POSTGRES_URL}?options=-c%20application_name%3D{name}"
    storage = SQLStorage(url, schema=schema, check_schema=False)
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await storage.open()
        assert await connections_named(name) == 0
        # Not half open: a second open fails the same way instead of returning at once.
        with pytest.raises(asyncpg.UndefinedTableError):
            await storage.open()
        assert await connections_named(name) == 0
    finally:
        await storage.close()
        await drop_schema(schema)
