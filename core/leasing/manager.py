"""The lease manager: the one door through which the gateway takes and gives back upstreams.

It adds to storage what storage cannot do alone: waiting in line when every upstream is busy
(a release hands its capacity straight to the first waiter that can use it, so newcomers never
overtake the line), sessions that outlive a request, callbacks, and the sweeper that takes back
expired leases.

Its surface: take a lease now (`take_now`, `taken`) or wait for one (`acquire`, `lease`), give
it back (`give_back`, or `put_back` to wait until it is written), feed health (`report`,
`report_soon`, `eject`, `readmit`), read pools (`pool`, `pools`, `stats`, `upstreams`,
`waiting`). Its parts are private: what this process holds, and leasing and giving back without
awaiting (`core.leasing.holdings`, compiled with the request path); the waiting line
(`core.leasing.line`); health intake (`core.leasing.health_feed`); the storage going away and
coming back (`core.leasing.outages`: giving back never fails for want of storage, what it
cannot take is kept and written once it answers). Nothing outside reaches them, or the storage
behind them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from core.backlog import LeaseWrite
from core.clock import Clock, SystemClock
from core.errors import StorageUnavailable
from core.leasing.health_feed import HealthFeed
from core.leasing.holdings import Holdings
from core.leasing.line import WaitingLine
from core.leasing.outages import Outages
from core.models import Lease, LeaseRequest, Pool, PoolStats, Upstream
from core.storage.interface import Storage

__all__ = ["LeaseCallback", "LeaseEvent", "LeaseEventKind", "LeaseManager"]

log = logging.getLogger("proxygate.leasing")

class LeaseEventKind(StrEnum):
    ACQUIRED = "acquired"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(slots=True, frozen=True)
class LeaseEvent:
    kind: LeaseEventKind
    lease: Lease
    #: Seconds the acquirer waited in line (0.0 for release events).
    waited: float
    #: Seconds the lease had been held (0.0 for acquire events).
    held: float
    stats: PoolStats


LeaseCallback = Callable[[LeaseEvent], None]


class LeaseManager:
    def __init__(
        self,
        storage: Storage,
        *,
        clock: Clock | None = None,
        instance_id: str | None = None,
        sweep_interval: float = 1.0,
        poll_interval: float = 0.05,
    ) -> None:
        self._storage = storage
        holder = instance_id or f"gw-{secrets.token_hex(6)}"
        #: Acquirers waiting while every upstream of their pool is busy.
        self._line = WaitingLine(
            storage, holder, lambda: self.clock, poll_interval, self.release, self._return_grant
        )
        #: What this process holds, and leasing and giving back without awaiting.
        self._holdings = holdings = Holdings(
            storage,
            clock or SystemClock(),
            holder,
            self._line.queues,
            self._storage_down,
            self._put_back_in_task,
        )
        self.sweep_interval = sweep_interval
        self._on_acquire: list[LeaseCallback] = []
        self._on_release: list[LeaseCallback] = []
        # Lease ends started from `give_back` that had to await (ended at `close`).
        self._giving_back: set[asyncio.Task[bool]] = set()
        # The request path's calls go straight to the compiled part (an interpreted method
        # in between would cost a frame per request):
        #: `take_now(request)`: a lease at once; a future that brings one without waiting in
        #: line (read it with `taken(request, future)`, which must be called once it is done:
        #: its lease is then the caller's); or None when leasing must be awaited (`acquire`).
        #: Raises what `acquire` raises.
        self.take_now = holdings.take_now
        self.taken = holdings.taken
        #: `give_back(lease)`: `put_back` without waiting for it, done at once where the
        #: storage can, else in a task of the manager's own (`close` waits for it).
        self.give_back = holdings.give_back
        self._health = HealthFeed(storage, holdings, self._storage_down)
        #: Feed an outcome into its upstream's health (`HealthFeed.report`): awaited, or
        #: without waiting for a storage that takes its time (`report_soon`).
        self.report = self._health.report
        self.report_soon = self._health.report_soon
        self._sweeper: asyncio.Task[None] | None = None
        #: Capacity may have appeared without a release (upstreams added or re-admitted):
        #: offered to the waiters of the pool.
        self.notify = self._line.notify
        #: How many acquirers wait in line for a pool.
        self.waiting = self._line.waiting
        self._outages = Outages(storage, holdings)

    @property
    def clock(self) -> Clock:
        return self._holdings.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self._holdings.clock = clock

    @property
    def instance_id(self) -> str:
        """The holder name of this process's leases."""
        return self._holdings.holder

    @property
    def lost_leases(self) -> int:
        """Leases in use here that other processes took back while the storage was out of
        reach for longer than its holder grace."""
        return self._outages.lost_leases

    @property
    def double_releases(self) -> int:
        """Releases of leases already released (or expired): each changed nothing."""
        return self._holdings.double_releases

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="lease-sweeper")

    async def close(self) -> None:
        """Stop: everything started here ends, and what this process holds goes back (its
        sessions' leases included) as far as the storage answers."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await sweeper
        await self._line.close()
        await self._health.close()
        if self._giving_back:
            await asyncio.gather(*self._giving_back, return_exceptions=True)
        releasing = self._holdings.releasing
        if releasing:
            await asyncio.wait(releasing)
        if sweeper is not None:  # started, so the storage was open
            await self._release_sessions()
        backlog = self._holdings.backlog
        if backlog:
            try:
                await self._apply_backlog()
            except StorageUnavailable:
                log.warning(
                    "closing with the storage unavailable: %d lease writes and %d outcomes "
                    "not written; other processes' sweeps take the leases back once this "
                    "holder has been silent for the storage's holder grace",
                    len(backlog.leases),
                    len(backlog.outcomes),
                )

    async def __aenter__(self) -> LeaseManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- callbacks ----------------------------------------------------------------------------

    def on_acquire(self, callback: LeaseCallback) -> None:
        self._on_acquire.append(callback)
        self._holdings.told = True  # every lease then goes through here, to be told

    def on_release(self, callback: LeaseCallback) -> None:
        """Called for releases and for expiries (`LeaseEvent.kind` tells which)."""
        self._on_release.append(callback)
        self._holdings.told = True

    # -- leasing ------------------------------------------------------------------------------

    async def acquire(self, request: LeaseRequest, timeout: float) -> Lease:
        """Lease an upstream, waiting in line up to `timeout` seconds while all are busy.

        Raises PoolNotFound, or NoUpstreamAvailable (at once when nothing could ever match,
        after `timeout` when everything stayed busy).
        """
        offer = True
        taken = self._holdings.take_now(request)
        if type(taken) is Lease:
            return taken
        if taken is not None:
            pending = cast("asyncio.Future[Any]", taken)
            try:
                await pending
                lease = self._holdings.taken(request, pending)
            except BaseException:
                if not pending.done():
                    pending.cancel()  # a lease granted after this is given back
                raise
            if lease is not None:
                return lease
            offer = False  # the storage said all are busy, or could not decide: awaited
        if request.session is not None or not self._line.queues.get(request.pool):
            lease = await self._storage.acquire(
                request, holder=self.instance_id, now=self.clock.now()
            )
            if lease is not None:
                # A session already bound is not new capacity: it never queues.
                if lease.uses > 1 or not self._line.queues.get(request.pool):
                    return await self._acquired(lease, 0.0)
                # A fresh grant while others wait: offered to them first, then to us, in line.
                await self._return_grant(lease)
            else:
                offer = False
        started = time.perf_counter()
        lease = await self._line.wait(request, timeout, started, offer=offer)
        return await self._acquired(lease, time.perf_counter() - started)

    async def _acquired(self, lease: Lease, waited: float) -> Lease:
        holdings = self._holdings
        holdings.hold(lease)
        if lease.session is not None:
            holdings.session_user_joined(lease)
            backlog = holdings.backlog
            if lease.id in backlog.leases or backlog.lock.locked():
                async with backlog.lock:  # the kept countdown is written first
                    backlog.forget(lease.id)
            try:
                await self._storage.renew(lease, None)  # in use: no idle countdown
            except StorageUnavailable:
                await self.put_back(lease)  # not ours after all: its idle countdown goes on
                raise
        if self._on_acquire:
            await self._emit(self._on_acquire, LeaseEventKind.ACQUIRED, lease, waited, 0.0)
        return lease

    async def release(self, lease: Lease) -> bool:
        """Give a lease back. A second release of the same lease changes nothing: it returns
        False and is counted in `double_releases`. While the storage is unavailable the
        release is kept and written once it answers (True: it will be)."""
        # This release is the lease's last word now (any write kept for it is stale).
        lost = self._holdings.ended(lease)
        try:
            released = await self._storage.release(lease)
        except StorageUnavailable as error:
            self._holdings.keep(LeaseWrite(lease, release=True), error)
            return True
        if lost:  # taken back by another process: nothing was ours to release
            return False
        if not released:
            self._holdings.released_twice(lease)
            return False
        await self._released(lease, True)
        return True

    async def _released(self, lease: Lease, released: bool) -> None:
        """Capacity came back: to the waiters first, then the callbacks hear of it."""
        if not released:
            return
        if self._line.queues.get(lease.pool):
            await self._line.hand_off(lease.pool)
        if self._on_release:
            held = self.clock.now() - lease.acquired_at
            await self._emit(self._on_release, LeaseEventKind.RELEASED, lease, 0.0, held)

    async def _return_grant(self, lease: Lease) -> None:
        """Give back a fresh grant nobody used (kept for later if the storage is unavailable)."""
        try:
            await self._storage.release(lease)
        except StorageUnavailable as error:
            self._holdings.keep(LeaseWrite(lease, release=True), error)

    async def renew(self, lease: Lease, duration: float | None) -> bool:
        """Let a held lease live `duration` more seconds from now (None: until released)."""
        expires_at = None if duration is None else self.clock.now() + duration
        return await self._storage.renew(lease, expires_at)

    async def put_back(self, lease: Lease) -> bool:
        """End one use of a lease: released, or for a session's lease, left bound to its
        session, whose idle countdown starts when its last user is done."""
        if lease.session is None:
            return await self.release(lease)
        holdings = self._holdings
        if not holdings.last_session_user(lease):
            return True
        if holdings.parted(lease):
            return await self.release(lease)
        expires_at = holdings.idle_until(lease)
        try:
            return await self._storage.renew(lease, expires_at)
        except StorageUnavailable as error:
            self._holdings.keep(LeaseWrite(lease, release=False, expires_at=expires_at), error)
            return True

    async def unbind_session(self, lease: Lease, *, fail: bool) -> None:
        """Part a session from `lease`, whose upstream failed: its next request binds another
        upstream or, with `fail`, fails until the session's idle TTL has passed. The lease
        itself ends when its last user puts it back."""
        fail_for = (lease.idle_ttl or 0.0) if fail else None
        await self._storage.unbind_session(lease, self.clock.now(), fail_for=fail_for)
        self._holdings.unbind(lease)

    def users_of(self, lease: Lease) -> int:
        """How many acquirers are using a session's lease right now."""
        return self._holdings.users_of(lease)

    @asynccontextmanager
    async def lease(self, request: LeaseRequest, timeout: float) -> AsyncIterator[Lease]:
        """Hold a lease for the block: released on every exit, cancellation included.

        A session's lease outlives the block (that is what a session is for); leaving the
        block restarts its idle countdown instead.
        """
        lease = await self.acquire(request, timeout)
        try:
            yield lease
        finally:
            await self.put_back(lease)

    async def eject(self, upstream_id: str, until: float) -> Upstream:
        """Lease an upstream no more until `until` (a check found it failing)."""
        return await self._storage.eject(upstream_id, until, self.clock.now())

    async def readmit(self, upstream_id: str) -> Upstream:
        """Lease an ejected upstream again (an active check found it working)."""
        upstream = await self._storage.readmit(upstream_id, self.clock.now())
        log.info("upstream %s re-admitted: it passed its checks", upstream_id)
        self.notify(upstream.pool)
        return upstream

    async def sweep(self) -> list[Lease]:
        """Write what was kept while the storage was unavailable, release expired leases and
        re-admit upstreams whose ejection is over (the background sweeper calls this
        periodically). Raises StorageUnavailable while the storage is."""
        started = time.monotonic()
        if self._holdings.backlog:
            await self._apply_backlog()
        for upstream in await self._storage.readmit_due(self.clock.now()):
            log.info("upstream %s re-admitted: its ejection time is over", upstream.id)
            self.notify(upstream.pool)
        if self._health.panicking:
            await self._health.check_panic()
        expired = await self._storage.release_expired(self.clock.now())
        for lease in expired:
            self._holdings.expired(lease)
        await self._outages.answered(started)
        await self._outages.look_for_unanswered()
        for pool in {lease.pool for lease in expired}:
            if self._line.queues.get(pool):
                await self._line.hand_off(pool)
        if self._on_release:
            now = self.clock.now()
            for lease in expired:
                held = now - lease.acquired_at
                await self._emit(self._on_release, LeaseEventKind.EXPIRED, lease, 0.0, held)
        return expired


    # -- reading pools ------------------------------------------------------------------------

    async def pool(self, name: str) -> Pool:
        """The pool named so (PoolNotFound if none is)."""
        return await self._storage.get_pool(name)

    async def pools(self) -> list[Pool]:
        return await self._storage.list_pools()

    async def stats(self, pool: str) -> PoolStats:
        return await self._storage.stats(pool, self.clock.now())

    async def upstreams(self, pool: str) -> list[Upstream]:
        return await self._storage.list_upstreams(pool)

    async def _release_sessions(self) -> None:
        """Sessions outlive their requests: at close, what they still hold here goes back."""
        try:
            leases = await self._storage.list_leases()
        except StorageUnavailable:
            log.warning(
                "closing with the storage unavailable: this process's session leases are "
                "taken back by other processes' sweeps once its heartbeat has been silent "
                "for the holder grace"
            )
            return
        for lease in leases:
            if lease.holder == self.instance_id and lease.session is not None:
                await self.release(lease)

    # -- internals ----------------------------------------------------------------------------

    async def _emit(
        self,
        callbacks: list[LeaseCallback],
        kind: LeaseEventKind,
        lease: Lease,
        waited: float,
        held: float,
    ) -> None:
        try:
            stats = await self._storage.stats(lease.pool, self.clock.now())
        except StorageUnavailable:
            log.debug("lease %s event not told: the storage is unavailable", kind.value)
            return
        event = LeaseEvent(kind, lease, waited, held, stats)
        for callback in callbacks:
            try:
                callback(event)
            except Exception:
                log.exception("lease %s callback failed", kind.value)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except StorageUnavailable as error:
                self._storage_down(error)
            except Exception:
                log.exception("lease sweep failed; trying again in %gs", self.sweep_interval)

    # -- the storage going away and coming back -----------------------------------------------

    async def _apply_backlog(self) -> None:
        backlog = self._holdings.backlog
        kept, dropped = len(backlog), backlog.dropped_outcomes
        await backlog.apply(self._storage, self._released, self._health.recorded)
        log.info("wrote %d releases and outcomes kept while the storage was unavailable", kept)
        if dropped:
            log.warning("%d outcomes were dropped while the storage was unavailable", dropped)
            backlog.dropped_outcomes = 0

    def _put_back_in_task(self, lease: Lease) -> None:
        task = asyncio.get_running_loop().create_task(self.put_back(lease), name="give-back")
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    def _storage_down(self, error: StorageUnavailable) -> None:
        self._outages.down(error)
