"""SQLite's writer: transactions asked for while one runs are run together, in the next one.

SQLite has one writer at a time, so concurrent callers would only queue for its lock; here they
queue in memory instead, and everything that queued during a transaction runs in the next,
in arrival order, under one BEGIN IMMEDIATE and one COMMIT (one sync to disk for the lot).
Each caller's work is its own: a core error ends only that caller's part (what it did before
stays, as with a transaction of its own), and any other failure reruns the batch's parts one
transaction each, so that one bad part cannot take the others down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.errors import CoreError

__all__ = ["Batcher"]

T = TypeVar("T")
_Body = Callable[[AsyncConnection], Awaitable[Any]]
_Part = tuple[_Body, "asyncio.Future[Any]"]


class Batcher:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._queue: list[_Part] = []
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((body, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain(), name="sqlite-writer")
        return await future

    async def close(self) -> None:
        """Wait for the work already queued."""
        drainer = self._drainer
        if drainer is not None:
            await asyncio.shield(drainer)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._run(batch)
        finally:
            self._drainer = None

    async def _run(self, batch: list[_Part]) -> None:
        results: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        try:
            async with self._engine.connect() as conn:
                await conn.begin()
                for body, future in batch:
                    try:
                        results.append((future, None, await body(conn)))
                    except CoreError as refusal:
                        results.append((future, refusal, None))
                await conn.commit()
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0][1], error, None)
                return
            for part in batch:  # find the part that failed; the others still happen
                await self._run([part])
            return
        for future, outcome, result in results:
            _settle(future, outcome, result)


def _settle(future: asyncio.Future[Any], error: BaseException | None, result: Any) -> None:
    if future.done():  # its caller stopped waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
