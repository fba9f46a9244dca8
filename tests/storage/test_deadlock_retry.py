"""A transaction PostgreSQL chose as a deadlock's victim is run again (it was rolled back whole);
any other error, and a deadlock that keeps coming back, reaches the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from asyncpg.exceptions import DeadlockDetectedError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.storage.sql.adapter import _transaction
from core.storage.sql.fast import DEADLOCK_RETRIES


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    made = create_async_engine("sqlite+aiosqlite://")
    try:
        yield made
    finally:
        await made.dispose()


def failing(
    error: Exception, times: int
) -> tuple[list[int], Callable[[AsyncConnection], Awaitable[int]]]:
    calls: list[int] = []

    async def body(conn: AsyncConnection) -> int:
        calls.append(1)
        if len(calls) <= times:
            raise DBAPIError("SELECT 1", None, error)
        return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one())

    return calls, body


async def test_a_deadlock_victim_runs_again(engine: AsyncEngine) -> None:
    calls, body = failing(DeadlockDetectedError("deadlock detected"), 2)
    assert await _transaction(engine, body) == 42
    assert len(calls) == 3


async def test_a_deadlock_that_keeps_coming_back_is_raised(engine: AsyncEngine) -> None:
    calls, body = failing(DeadlockDetectedError("deadlock detected"), DEADLOCK_RETRIES + 1)
    with pytest.raises(DBAPIError):
        await _transaction(engine, body)
    assert len(calls) == DEADLOCK_RETRIES + 1


async def test_other_errors_are_not_run_again(engine: AsyncEngine) -> None:
    calls, body = failing(ValueError("not a deadlock"), 1)
    with pytest.raises(DBAPIError):
        await _transaction(engine, body)
    assert len(calls) == 1
