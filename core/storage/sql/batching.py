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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import Executable

from core.errors import CoreError
from core.storage.sql.engine import SQLITE_BUSY_TIMEOUT

__all__ = ["Batcher", "Coalescer"]

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
_Body = Callable[[AsyncConnection], Awaitable[Any]]
_Part = tuple[_Body, "asyncio.Future[Any]"]


class Coalescer(Generic[A, R]):
    """Runs calls in batches: `run(arguments)` answers each argument, in order.

    `orphan(result)` receives a result whose caller stopped waiting (a lease granted to a
    cancelled acquirer must still be given back). While `hold()` is true, calls wait: for
    another statement to `take` them, or for `kick`."""

    def __init__(
        self,
        run: Callable[[Sequence[A]], Awaitable[Sequence[R]]],
        *,
        in_flight: int = 1,
        max_batch: int = 64,
        orphan: Callable[[R], None] | None = None,
        hold: Callable[[], bool] | None = None,
    ) -> None:
        self._run = run
        self._in_flight = in_flight
        self._max_batch = max_batch
        self._orphan = orphan
        self._hold = hold
        self._queue: list[tuple[A, asyncio.Future[R]]] = []
        self._running = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        """Calls are waiting or being run."""
        return bool(self._queue) or self._running > 0 or self._scheduled

    def take(self) -> list[tuple[A, asyncio.Future[R]]]:
        """The calls waiting for their batch, handed over to be answered elsewhere (their
        futures are the caller's to settle), so that another statement can carry them."""
        taken = [(arg, future) for arg, future in self._queue if not future.done()]
        self._queue.clear()
        return taken

    async def call(self, argument: A) -> R:
        return await self.submit(argument)

    def submit(self, argument: A) -> asyncio.Future[R]:
        """The call, made without waiting: its future settles once its batch ran. A call whose
        future was cancelled before its batch went out is left out of it."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((argument, future))
        self.kick()
        return future

    def kick(self) -> None:
        """Send what waits, if nothing holds it back any more."""
        if self._ready():
            self._scheduled = True
            task = asyncio.get_running_loop().create_task(self._send(), name="sql-batch")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _ready(self) -> bool:
        if self._hold is not None and self._hold():
            return False  # whoever holds calls back `kick`, or `take`s them
        return bool(self._queue) and not self._scheduled and self._running < self._in_flight

    async def _send(self) -> None:
        # A task's first step runs at the end of this loop turn: the callers woken in this
        # turn join the batch.
        self._scheduled = False
        try:
            while True:
                queue, limit = self._queue, self._max_batch
                batch = [(arg, future) for arg, future in queue[:limit] if not future.done()]
                del queue[:limit]
                if batch:
                    await self._answer(batch)
                # Callers that came while the statement was out go at once, from this step:
                # a task of their own would start a loop turn later, and under load a turn
                # is long.
                if not self._ready():
                    break
        finally:
            self.kick()

    async def _answer(self, batch: list[tuple[A, asyncio.Future[R]]]) -> None:
        self._running += 1
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


class Batcher:
    """SQLite's writer: one connection of its own, on a thread of its own.

    A batch is one trip to that thread: BEGIN IMMEDIATE, every part, COMMIT. The parts are
    units of work written against `AsyncConnection`; on the thread they get `_Inline`, whose
    awaits never suspend, so each part runs to its end at once without the event loop (a part
    that awaits anything else is refused). One trip per batch, where the async driver would
    take several per statement, is most of what SQLite storage costs.

    The connection runs in WAL mode with `synchronous=NORMAL`: a commit no longer waits for the
    disk, and what an operating-system crash or power loss could take back (the last commits,
    never the file's consistency) belonged to gateway processes on this host, which that same
    crash ends: SQLite is shared only by processes on one machine. A crash of the process
    itself loses nothing committed.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = create_engine(
            engine.url.set(drivername="sqlite+pysqlite"),
            poolclass=NullPool,
            # The driver's own transactions are off: each batch says BEGIN IMMEDIATE itself.
            isolation_level="AUTOCOMMIT",
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT},
        )
        event.listen(self._engine, "connect", _configure)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._connection: Connection | None = None  # used on the thread only
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
        """Wait for the work already queued, then close the connection and the thread."""
        drainer = self._drainer
        if drainer is not None:
            await asyncio.shield(drainer)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._disconnect)
        self._thread.shutdown(wait=False)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._run(batch)
        finally:
            self._drainer = None

    async def _run(self, batch: list[_Part]) -> None:
        bodies = [body for body, _ in batch]
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._thread, self._transact, bodies)
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0][1], error, None)
                return
            for part in batch:  # find the part that failed; the others still happen
                await self._run([part])
            return
        for (_, future), (refusal, result) in zip(batch, outcomes, strict=True):
            _settle(future, refusal, result)

    def _transact(self, bodies: list[_Body]) -> list[tuple[CoreError | None, Any]]:
        """On the thread: the bodies in one transaction; each one's refusal or result."""
        connection = self._connection
        if connection is None:
            connection = self._connection = self._engine.connect()
        # Take the write lock up front: a transaction that reads and then writes could
        # otherwise find its snapshot stale at the write and fail instead of waiting.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        outcomes: list[tuple[CoreError | None, Any]] = []
        try:
            inline = cast(AsyncConnection, _Inline(connection))
            for body in bodies:
                try:
                    outcomes.append((None, _complete(body(inline))))
                except CoreError as refusal:
                    outcomes.append((refusal, None))
            connection.exec_driver_sql("COMMIT")
        except BaseException:
            self._abandon(connection)
            raise
        return outcomes

    def _abandon(self, connection: Connection) -> None:
        """Roll back; a connection that cannot is dropped (the next batch opens another)."""
        try:
            connection.exec_driver_sql("ROLLBACK")
        except Exception:
            self._connection = None
            with suppress(Exception):
                connection.invalidate()

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        self._engine.dispose()


class _Inline:
    """The part of `AsyncConnection` the units of work use, over a sync connection: its
    coroutines return without suspending."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def execute(self, statement: Executable, parameters: Any = None) -> Any:
        return self._connection.execute(statement, parameters)

    async def stream(self, statement: Executable) -> _InlineStream:
        return _InlineStream(self._connection.execute(statement))


class _InlineStream:
    """An `AsyncResult`'s iteration and close over a sync result."""

    __slots__ = ("_result",)

    def __init__(self, result: Any) -> None:
        self._result = result

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._rows()

    async def _rows(self) -> AsyncIterator[Any]:
        for row in self._result:
            yield row

    async def close(self) -> None:
        self._result.close()


def _complete(work: Awaitable[T]) -> T:
    """Run a coroutine that never suspends to its end, here and now."""
    steps = work.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    steps.close()
    raise RuntimeError("a SQLite unit of work awaited something other than its connection")


def _configure(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _settle(future: asyncio.Future[Any], error: BaseException | None, result: Any) -> None:
    if future.done():  # its caller stopped waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
