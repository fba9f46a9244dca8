"""`postgresql://` and `sqlite:///`: the leasing core's storage in a database many processes share.

Every method is one transaction. On PostgreSQL, rows are locked as they are chosen
(`FOR UPDATE SKIP LOCKED`: concurrent acquirers pass over an upstream being leased instead of
queueing behind it) and the hot paths are single statements (`core.storage.sql.fast`). On
SQLite, writers are serialised: in this process by one writer that runs whatever queued
meanwhile in one transaction (`core.storage.sql.batching`), across processes by `BEGIN
IMMEDIATE` and the busy timeout.

A method that refuses with a core error (SessionFailed, NoUpstreamAvailable...) commits what it
did before refusing, as the memory adapter keeps its changes; any other error rolls back.

A database that goes away makes every method raise StorageUnavailable (a statement that hangs,
after `statement_timeout`) until it is back; nothing needs reopening. Sweeps judge other holders
dead only once this process has been in touch with the database for a whole `holder_grace`
without a break: after an outage that every process shared (a database restart), the first
sweep must not take the leases of holders that had no chance to beat yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from typing import Any, TypeVar

from asyncpg.exceptions import DeadlockDetectedError
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.backlog import OutcomeWrite
from core.errors import CatalogError, CoreError, PoolNotFound, UpstreamNotFound
from core.health import HealthRecord, HealthUpdate, RecordSource, Transition
from core.models import Lease, LeaseRequest, Outcome, Pool, PoolStats, Upstream
from core.storage.sql import ahead, catalog, holders, leasing, outcomes
from core.storage.sql.batching import Batcher, Coalescer
from core.storage.sql.engine import make_engine
from core.storage.sql.errors import StorageUnavailable, is_unavailable
from core.storage.sql.fast import DEADLOCK_RETRIES, FastPaths, verdict
from core.storage.sql.lanes import Lanes
from core.storage.sql.migrate import schema_status
from core.storage.sql.statements import Flavor
from core.storage.sql.tables import parted_sessions

__all__ = ["SQLStorage", "SchemaOutOfDate", "StorageUnavailable"]

log = logging.getLogger("proxygate.storage.sql")
T = TypeVar("T")

#: Seconds a PostgreSQL statement may go unanswered before it fails as StorageUnavailable; the
#: hot paths take milliseconds, so only a database that stopped answering comes near it.
STATEMENT_TIMEOUT = 10.0


class SchemaOutOfDate(CoreError):
    """The database's schema is not the one this code needs: run `proxygate db upgrade`."""


class SQLStorage:
    shared = True

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        holder_grace: float = 30.0,
        heartbeat_interval: float = 5.0,
        pool_size: int = 8,
        max_overflow: int = 16,
        lanes: int = 8,
        check_schema: bool = True,
        statement_timeout: float = STATEMENT_TIMEOUT,
        lease_ahead: int = ahead.MOST,
    ) -> None:
        """`holder_grace`: seconds after a holder's last heartbeat before its leases are
        released by a sweep; `heartbeat_interval` should be a fraction of it. On PostgreSQL,
        `lanes` connections serve the single-statement hot paths and `pool_size` (plus up to
        `max_overflow`) the transactions, and a statement unanswered for `statement_timeout`
        seconds fails as StorageUnavailable. `lease_ahead`: on PostgreSQL, leases held ahead
        of requests of one kind at most (`ahead`; 0 for none)."""
        self.url = url
        self.schema = schema
        self.holder_grace = holder_grace
        self.heartbeat_interval = heartbeat_interval
        self._pool_size = pool_size
        self._max_overflow = max_overflow
        self._lane_count = lanes
        self._check_schema = check_schema
        self._statement_timeout = statement_timeout
        self._lease_ahead = lease_ahead
        # Monotonic times: since when this process has been in touch with the database without
        # a break (None: out of touch now), and when it last was.
        self._in_touch_since: float | None = None
        self._last_touch = 0.0
        #: Calls that found the database gone, all told. Whatever call it was (an acquire
        #: whose answer was lost included), the lease manager sees this move and looks for
        #: grants nobody here heard of (`core.unanswered`).
        self.contact_losses = 0
        self._engine: AsyncEngine | None = None
        self._flavor = Flavor(postgres=not url.lower().startswith("sqlite"))
        self._fast: FastPaths | None = None
        self._lanes: Lanes | None = None
        # SQLite: this process's transactions, run one at a time (see `batching`).
        self._batcher: Batcher | None = None
        # PostgreSQL: what traffic tells of upstreams' health, written together by one
        # transaction per batch (each outcome alone would lock its upstream's row for a
        # transaction of its own, and every request dialing one upstream would queue there).
        self._outcomes: Coalescer[OutcomeWrite, HealthUpdate | UpstreamNotFound] | None = None
        self._holders: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._engine is not None:
            return
        if self._check_schema:
            status = await schema_status(self.url, schema=self.schema)
            if not status.is_current:
                raise SchemaOutOfDate(
                    f"the storage database's schema is at {status.current or 'nothing'}, "
                    f"this proxygate needs {status.head}: run `proxygate db upgrade`"
                )
        lanes = self._lane_count if self._flavor.postgres else 0
        self._engine = make_engine(
            self.url,
            schema=self.schema,
            pool_size=self._pool_size + lanes,
            max_overflow=self._max_overflow,
            command_timeout=self._statement_timeout,
        )
        try:
            if self._flavor.postgres:
                self._lanes = Lanes(self._engine, lanes, on_unavailable=self._lost_touch)
                self._fast = FastPaths(
                    self._lanes, self._engine.dialect, lease_ahead=self._lease_ahead
                )
                await self._fast.warm_up()
                self._outcomes = Coalescer(self._record_outcomes)
            else:
                self._batcher = Batcher(self._engine)
        except BaseException:
            # Half open is not open: the connections go, and the next `open` starts afresh
            # instead of finding an engine and taking the storage for ready.
            await self.close()
            raise
        self._touched()
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="storage-heartbeat")

    async def close(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeat
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close()
        if self._fast is not None:
            await self._fast.close()
        engine, self._engine = self._engine, None
        lanes, self._lanes = self._lanes, None
        self._fast = None
        self._outcomes = None
        if lanes is not None:
            await lanes.close()
        if engine is not None:
            await engine.dispose()

    # -- catalog ------------------------------------------------------------------------------

    async def add_pool(self, pool: Pool) -> None:
        try:
            await self._tx(lambda conn: catalog.add_pool(conn, pool))
        except IntegrityError:
            raise CatalogError(f"pool {pool.name!r} already exists") from None
        self._forget_pool(pool.name)

    async def update_pool(self, pool: Pool) -> None:
        await self._tx(lambda conn: catalog.update_pool(conn, pool))
        self._forget_pool(pool.name)

    async def remove_pool(self, name: str) -> None:
        if self._fast is not None:  # a lease nobody took yet must not keep the pool
            await self._fast.give_back_ahead()
        try:
            await self._tx(lambda conn: catalog.remove_pool(conn, name))
        except IntegrityError:
            raise CatalogError(f"pool {name!r} still holds leases") from None
        self._forget_pool(name)

    async def get_pool(self, name: str) -> Pool:
        return await self._tx(lambda conn: catalog.get_pool(conn, name))

    async def list_pools(self) -> list[Pool]:
        return await self._tx(catalog.list_pools)

    async def add_upstreams(self, upstreams: Iterable[Upstream]) -> int:
        batch = list(upstreams)
        try:
            return await self._tx(lambda conn: catalog.add_upstreams(conn, batch))
        except IntegrityError:
            raise CatalogError("an upstream of the batch already exists") from None

    async def update_upstream(self, upstream_id: str, **changes: Any) -> Upstream:
        self._forget_upstream(upstream_id)
        return await self._tx(lambda conn: catalog.update_upstream(conn, upstream_id, changes))

    async def remove_upstream(self, upstream_id: str) -> None:
        if self._fast is not None:  # nor the upstream's row
            await self._fast.give_back_ahead()
        await self._tx(lambda conn: catalog.remove_upstream(conn, upstream_id))

    async def get_upstream(self, upstream_id: str) -> Upstream:
        return await self._tx(lambda conn: catalog.get_upstream(conn, upstream_id))

    async def list_upstreams(self, pool: str) -> list[Upstream]:
        return await self._tx(lambda conn: catalog.list_upstreams(conn, pool))

    # -- leasing ------------------------------------------------------------------------------

    async def acquire(self, request: LeaseRequest, *, holder: str, now: float) -> Lease | None:
        if holder not in self._holders:
            await self._tx(lambda conn: holders.beat(conn, self._flavor, [holder]))
            self._holders.add(holder)
        fast = self._fast
        if fast is not None and fast.handles(request):
            # Safe to cancel as it is: a lease granted to a caller gone is given back there.
            lease = await fast.acquire(request, holder, now)
            if lease is not False:
                return lease
            # The fast path could not decide (unknown pool, pool settings changed, nothing
            # free): the full transaction decides, and explains an empty pool.
        # Shielded: a caller cancelled mid-transaction must not leave a lease nobody holds.
        task = asyncio.get_running_loop().create_task(
            self._acquire(request, holder, now), name="sql-acquire"
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            lease = await _settled(task)
            if lease is not None and lease.uses == 1:
                if fast is not None:
                    # Whatever the database does meanwhile: it may be why the caller gave up.
                    fast.give_back(lease)
                else:
                    await self.release(lease)
            raise

    def acquire_nowait(
        self, request: LeaseRequest, *, holder: str, now: float
    ) -> asyncio.Future[Any] | None:
        fast = self._fast
        if fast is None or holder not in self._holders or not fast.handles(request):
            return None
        return fast.acquire_soon(request, holder, now)

    def acquired(self, request: LeaseRequest, pending: asyncio.Future[Any]) -> Lease | None:
        lease = verdict(request, pending.result())
        return None if lease is False else lease

    async def _acquire(self, request: LeaseRequest, holder: str, now: float) -> Lease | None:
        fast = self._fast

        async def body(conn: AsyncConnection) -> Lease | None:
            pool = await leasing.load_pool(conn, request.pool)
            if pool is None:
                raise PoolNotFound(request.pool)
            if fast is not None:
                fast.remember(pool)
            return await leasing.acquire(conn, self._flavor, pool, request, holder, now)

        return await self._tx(body)

    async def release(self, lease: Lease) -> bool:
        lease_id = leasing.lease_key(lease)
        if lease_id is None:
            return False
        fast = self._fast
        # Shielded: a release the caller stopped waiting for still happens.
        if fast is not None:
            return await asyncio.shield(fast.release(lease_id))
        return await asyncio.shield(self._tx(lambda conn: leasing.drop(conn, lease_id)))

    def release_nowait(self, lease: Lease) -> asyncio.Future[bool] | None:
        lease_id = leasing.lease_key(lease)
        if self._fast is None or lease_id is None:
            return None
        return self._fast.release(lease_id, linger=True)

    def renew_nowait(self, lease: Lease, expires_at: float | None) -> None:
        """Never at once: a renewal is a statement of its own, awaited (`renew`)."""
        return None

    async def renew(self, lease: Lease, expires_at: float | None) -> bool:
        lease_id = leasing.lease_key(lease)
        if lease_id is None:
            return False
        fast = self._fast
        renewed: bool | None = None
        if fast is not None:
            renewed = await fast.renew(lease_id, expires_at)
        if renewed is None:
            renewed = await self._tx(lambda conn: leasing.renew(conn, lease_id, expires_at))
        if renewed:
            lease.expires_at = expires_at
        return renewed

    async def unbind_session(self, lease: Lease, now: float, *, fail_for: float | None) -> None:
        await self._tx(
            lambda conn: leasing.unbind_session(conn, self._flavor, lease, now, fail_for)
        )

    async def release_expired(self, now: float) -> list[Lease]:
        flavor, grace = self._flavor, self.holder_grace
        since = self._in_touch_since
        judging = since is not None and time.monotonic() - since >= grace
        dead = holders.dead_holders(flavor, grace) if judging else holders.nobody()

        async def body(conn: AsyncConnection) -> list[Lease]:
            # This process is alive: say so before judging the others.
            await holders.beat(conn, flavor, self._holders)
            expired = await leasing.expire(conn, now, dead)
            await conn.execute(
                parted_sessions.delete().where(
                    parted_sessions.c.until.is_not(None), parted_sessions.c.until <= now
                )
            )
            await catalog.collect_retired(conn)
            await holders.forget_dead(conn, flavor, grace)
            return expired

        return await self._tx(body)

    def leases_held_ahead(self) -> set[str]:
        """The ids of the leases granted ahead of requests, not handed out yet."""
        return set() if self._fast is None else self._fast.held_ahead()

    async def list_leases(self, pool: str | None = None) -> list[Lease]:
        return await self._tx(lambda conn: leasing.list_leases(conn, pool))

    # -- health -------------------------------------------------------------------------------

    async def record_outcome(
        self,
        upstream_id: str,
        outcome: Outcome,
        latency: float | None,
        now: float,
        *,
        source: RecordSource = RecordSource.TRAFFIC,
        detail: str | None = None,
    ) -> HealthUpdate:
        write = OutcomeWrite(upstream_id, outcome, latency, now, source, detail)
        if source is RecordSource.TRAFFIC and self._outcomes is not None:
            result = await self._outcomes.call(write)
        else:
            (result,) = await self._record_outcomes((write,))
        if isinstance(result, UpstreamNotFound):
            raise result
        if result.transition is Transition.EJECTED:
            self._forget_upstream(upstream_id)
        return result

    async def _record_outcomes(
        self, writes: Sequence[OutcomeWrite]
    ) -> list[HealthUpdate | UpstreamNotFound]:
        return await self._tx(lambda conn: outcomes.record_outcomes(conn, writes))

    async def eject(self, upstream_id: str, until: float, now: float) -> Upstream:
        self._forget_upstream(upstream_id)
        return await self._tx(lambda conn: outcomes.eject(conn, upstream_id, until, now))

    async def readmit(self, upstream_id: str, now: float) -> Upstream:
        return await self._tx(lambda conn: outcomes.readmit(conn, upstream_id, now))

    async def readmit_due(self, now: float) -> list[Upstream]:
        return await self._tx(lambda conn: outcomes.readmit_due(conn, now))

    async def history(self, upstream_id: str) -> list[HealthRecord]:
        return await self._tx(lambda conn: outcomes.history(conn, upstream_id))

    async def stats(self, pool: str, now: float) -> PoolStats:
        return await self._tx(lambda conn: catalog.stats(conn, pool, now))

    # -- internals ----------------------------------------------------------------------------

    async def _tx(self, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        engine = self._engine
        if engine is None:
            raise RuntimeError("the storage is not open")
        try:
            if self._batcher is None:
                result = await _transaction(engine, body)
            else:
                result = await self._batcher.run(body)
        except CoreError as error:
            if isinstance(error, StorageUnavailable):
                self._lost_touch()
            else:
                self._touched()
            raise
        except Exception as error:
            if is_unavailable(error):
                self._lost_touch()
                raise StorageUnavailable(f"storage database unavailable: {error}") from error
            raise
        self._touched()
        return result

    def _touched(self) -> None:
        now = time.monotonic()
        # Silence longer than the grace counts as a break too (a stalled loop, a suspended
        # host): others may have judged this process dead meanwhile, and it them.
        if self._in_touch_since is None or now - self._last_touch > self.holder_grace:
            self._in_touch_since = now
        self._last_touch = now

    def _lost_touch(self) -> None:
        self._in_touch_since = None
        self.contact_losses += 1

    def _forget_pool(self, name: str) -> None:
        if self._fast is not None:
            self._fast.forget(name)

    def _forget_upstream(self, upstream_id: str) -> None:
        if self._fast is not None:
            self._fast.forget_upstream(upstream_id)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not self._holders:
                continue
            try:
                await self._tx(lambda conn: holders.beat(conn, self._flavor, self._holders))
            except StorageUnavailable as error:
                # The lease manager's sweeps say when the database goes and comes back.
                log.debug("storage heartbeat failed: %s", error)
            except Exception:
                log.warning(
                    "storage heartbeat failed; trying again in %gs",
                    self.heartbeat_interval,
                    exc_info=True,
                )


async def _transaction(engine: AsyncEngine, body: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """`body` in a transaction of its own, run again when PostgreSQL chose it as a deadlock's
    victim (rolled back whole, so nothing of it stays), as the batched statements are."""
    for attempt in range(DEADLOCK_RETRIES + 1):
        try:
            return await _transaction_once(engine, body)
        except DBAPIError as error:
            if attempt == DEADLOCK_RETRIES or not _deadlocked(error):
                raise
    raise AssertionError("unreachable")


def _deadlocked(error: DBAPIError) -> bool:
    cause = error.orig.__cause__ if error.orig is not None else None
    return isinstance(error.orig, DeadlockDetectedError) or isinstance(cause, DeadlockDetectedError)


async def _transaction_once(
    engine: AsyncEngine, body: Callable[[AsyncConnection], Awaitable[T]]
) -> T:
    async with engine.connect() as conn:
        await conn.begin()
        try:
            result = await body(conn)
        except CoreError:
            await conn.commit()  # a refusal keeps what was done before it, as in memory
            raise
        await conn.commit()
        return result


async def _settled(task: asyncio.Future[Lease | None]) -> Lease | None:
    """The result of a shielded acquire whose caller was cancelled (None if it failed)."""
    try:
        return await task
    except Exception:
        return None
