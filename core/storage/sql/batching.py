"""Many callers' work in one round trip and one commit: the storage's answer to a slow sync.

Each commit waits for its record to reach the disk, and that wait, not the statement, is most
of what a one-row write costs. So work that arrives together is done together:

- `Coalescer` (PostgreSQL's fast paths): calls of one kind made in the same event-loop turn go
  to the database as one statement, sent at the end of that turn. While `in_flight` statements
  of that kind are out, new calls gather and go together when one returns. One caller alone
  waits for nothing but its own statement.
- `Batcher` (SQLite): transactions asked for while one runs are run together, in the next one.
  SQLite has one writer at a time, so concurrent callers would only queue for its lock; here
  they queue in memory instead, and everything that queued during a transaction runs in the
  next, in arrival order, under one BEGIN IMMEDIATE and one COMMIT. Each caller's work is its
  own: a core error ends only that caller's part (what it did before stays, as with a
  transaction of its own), and any other failure reruns the batch's parts one transaction
  each, so that one bad part cannot take the others down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.errors import CoreError

__all__ = ["Batcher", "Coalescer"]

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
_Body = Callable[[AsyncConnection], Awaitable[Any]]
_Part = tuple[_Body, "asyncio.Future[Any]"]


class Coalescer(Generic[A, R]):
    """Runs calls in batches: `run(arguments)` answers each argument, in order.

    `orphan(result)` receives a result whose caller stopped waiting (a lease granted to a
    cancelled acquirer must still be given back)."""

    def __init__(
        self,
        run: Callable[[Sequence[A]], Awaitable[Sequence[R]]],
        *,
        in_flight: int = 1,
        max_batch: int = 64,
        orphan: Callable[[R], None] | None = None,
    ) -> None:
        self._run = run
        self._in_flight = in_flight
        self._max_batch = max_batch
        self._orphan = orphan
        self._queue: list[tuple[A, asyncio.Future[R]]] = []
        self._running = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        """Calls are waiting or being run."""
        return bool(self._queue) or self._running > 0 or self._scheduled

    async def call(self, argument: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((argument, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        if self._queue and not self._scheduled and self._running < self._in_flight:
            self._scheduled = True
            # At the end of this loop turn: the callers woken in this turn join the batch.
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        batch = [
            (arg, future) for arg, future in self._queue[: self._max_batch] if not future.done()
        ]
        del self._queue[: self._max_batch]
        if not batch:
            self._kick()
            return
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._execute(batch), name="sql-batch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[tuple[A, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([arg for arg, _ in batch])
        except BaseException as error:
            for _, future in batch:
                if not future.done():
                    if isinstance(error, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(error)
            if not isinstance(error, Exception):
                raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
                elif self._orphan is not None:
                    self._orphan(result)
        finally:
            self._running -= 1
            self._kick()


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
