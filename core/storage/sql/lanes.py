"""Driver connections the engine lends the fast paths, one statement at a time each.

A lane is an engine connection checked out once and kept (in autocommit: single statements need
no transaction), whose asyncpg connection runs prepared statements directly. A lane whose
connection fails or whose statement is cancelled is invalidated, and a database found gone
invalidates the idle lanes too (they were opened before it went), so a database restart costs
the calls in flight and nothing after: new lanes are opened on demand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.storage.sql.errors import StorageUnavailable, is_unavailable

__all__ = ["Lanes"]

#: Each lane's settings. The lanes run a handful of statements over and over: each is planned
#: once (PostgreSQL would otherwise re-plan the first five runs of each, at more than their
#: cost). A plan made once must hold as the tables change: every lease and release leaves a
#: dead row version behind until a vacuum, and a sequential scan reads them all, so a plan
#: made while the tables were small (where a scan from end to end is cheapest) slows every
#: statement down as they grow, until the next vacuum. Every row the lanes look up has an
#: index to find it by.
_SESSION = "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off"


class _Lane:
    __slots__ = ("connection", "driver")

    def __init__(self, connection: AsyncConnection, driver: Any) -> None:
        self.connection = connection
        self.driver = driver


class Lanes:
    def __init__(
        self, engine: AsyncEngine, size: int, *, on_unavailable: Callable[[], None] | None = None
    ) -> None:
        """`on_unavailable` is told each time the database is found gone."""
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._on_unavailable = on_unavailable
        self._free = asyncio.Semaphore(size)
        self._idle: list[_Lane] = []
        self._closed = False
        #: Lanes given back after `close`, closing in tasks of their own (awaited by `close`).
        self._closing: set[asyncio.Task[None]] = set()

    async def fetchrow(self, sql: str, args: list[Any]) -> Any:
        """Run one statement; its first row (None if it returned none)."""
        lane = await self._take()
        try:
            row = await lane.driver.fetchrow(sql, *args)
        except BaseException as error:
            # An error the server reported about the statement leaves the connection as good
            # as before; anything else (cancelled, cut off, the server going down, the driver's
            # own state gone wrong) leaves it unusable.
            gone = is_unavailable(error)
            broken = gone or not isinstance(error, asyncpg.PostgresError)
            if not broken:
                self._give_back(lane)
                raise
            await self._discard(lane)
            if not gone:
                raise
            idle, self._idle = self._idle, []
            for stale in idle:
                await _close(stale, invalidate=True)
            raise self._unavailable(error) from error
        self._give_back(lane)
        return row

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for lane in idle:
            await _close(lane, invalidate=False)
        if self._closing:
            await asyncio.gather(*self._closing)

    async def _take(self) -> _Lane:
        if self._closed:
            raise RuntimeError("the storage is closed")
        await self._free.acquire()
        if self._idle:
            return self._idle.pop()
        connection: AsyncConnection | None = None
        try:
            connection = await self._engine.connect()
            raw = await connection.get_raw_connection()
            assert raw.driver_connection is not None
            await raw.driver_connection.execute(_SESSION)
        except BaseException as error:
            self._free.release()
            if connection is not None:
                # A pooled connection from before an outage: checked out, it must go back
                # (invalidated) or the pool loses it.
                await _close(_Lane(connection, None), invalidate=True)
            if is_unavailable(error):
                raise self._unavailable(error) from error
            raise
        return _Lane(connection, raw.driver_connection)

    def _unavailable(self, error: BaseException) -> StorageUnavailable:
        if self._on_unavailable is not None:
            self._on_unavailable()
        return StorageUnavailable(f"storage database unavailable: {error}")

    def _give_back(self, lane: _Lane) -> None:
        self._free.release()
        if self._closed:
            task = asyncio.get_running_loop().create_task(
                _close(lane, invalidate=False), name="sql-lane-close"
            )
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            self._idle.append(lane)

    async def _discard(self, lane: _Lane) -> None:
        self._free.release()
        await _close(lane, invalidate=True)


async def _close(lane: _Lane, *, invalidate: bool) -> None:
    try:
        if invalidate:
            await lane.connection.invalidate()
        await lane.connection.close()
    except Exception:  # a connection already gone has nothing left to close
        pass
