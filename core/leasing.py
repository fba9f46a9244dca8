"""The lease manager: the one door through which the gateway takes and gives back upstreams.

It adds to storage what storage cannot do alone: waiting in line when every upstream is busy
(a release hands its capacity straight to the first waiter that can use it, so newcomers never
overtake the line), sessions that outlive a request, callbacks, and the sweeper that takes back
expired leases.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum

from core.clock import Clock, SystemClock
from core.errors import CoreError, NoUpstreamAvailable
from core.health import HealthUpdate, RecordSource, Transition
from core.models import Lease, LeaseRequest, Outcome, PoolStats, Upstream
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


class _Waiter:
    __slots__ = ("future", "request", "serving")

    def __init__(self, request: LeaseRequest, future: asyncio.Future[Lease]) -> None:
        self.request = request
        self.future = future
        self.serving = False


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
        self.storage = storage
        self.clock = clock or SystemClock()
        self.instance_id = instance_id or f"gw-{secrets.token_hex(6)}"
        self.sweep_interval = sweep_interval
        #: How often a waiter re-tries on its own when other processes share the storage.
        self.poll_interval = poll_interval
        self.double_releases = 0
        self._waiters: dict[str, deque[_Waiter]] = {}
        # Users of each session lease right now: it expires only once idle, not while in use.
        self._session_users: dict[str, int] = {}
        # Session leases their session left (`unbind_session`): released by their last user.
        self._unbound: set[str] = set()
        # Pools kept from ejecting by `max_ejection_percent`, until the sweeper sees them heal.
        self._panicking: set[str] = set()
        self._on_acquire: list[LeaseCallback] = []
        self._on_release: list[LeaseCallback] = []
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="lease-sweeper")

    async def close(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await sweeper

    async def __aenter__(self) -> LeaseManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- callbacks ----------------------------------------------------------------------------

    def on_acquire(self, callback: LeaseCallback) -> None:
        self._on_acquire.append(callback)

    def on_release(self, callback: LeaseCallback) -> None:
        """Called for releases and for expiries (`LeaseEvent.kind` tells which)."""
        self._on_release.append(callback)

    # -- leasing ------------------------------------------------------------------------------

    async def acquire(self, request: LeaseRequest, timeout: float) -> Lease:
        """Lease an upstream, waiting in line up to `timeout` seconds while all are busy.

        Raises PoolNotFound, or NoUpstreamAvailable (at once when nothing could ever match,
        after `timeout` when everything stayed busy).
        """
        offer = True
        if request.session is not None or not self._waiters.get(request.pool):
            lease = await self.storage.acquire(
                request, holder=self.instance_id, now=self.clock.now()
            )
            if lease is not None:
                # A session already bound is not new capacity: it never queues.
                if lease.uses > 1 or not self._waiters.get(request.pool):
                    return await self._acquired(lease, 0.0)
                # A fresh grant while others wait: offered to them first, then to us, in line.
                await self.storage.release(lease)
            else:
                offer = False
        started = time.perf_counter()
        lease = await self._wait(request, timeout, started, offer=offer)
        return await self._acquired(lease, time.perf_counter() - started)

    async def _acquired(self, lease: Lease, waited: float) -> Lease:
        if lease.session is not None:
            self._session_users[lease.id] = self._session_users.get(lease.id, 0) + 1
            await self.storage.renew(lease, None)  # in use: no idle countdown
        if self._on_acquire:
            await self._emit(self._on_acquire, LeaseEventKind.ACQUIRED, lease, waited, 0.0)
        return lease

    async def release(self, lease: Lease) -> bool:
        """Give a lease back. A second release of the same lease changes nothing: it returns
        False and is counted in `double_releases`."""
        self._session_users.pop(lease.id, None)
        self._unbound.discard(lease.id)
        if not await self.storage.release(lease):
            self.double_releases += 1
            log.debug("lease %s released twice (or after it expired)", lease.id)
            return False
        if self._waiters.get(lease.pool):
            await self._handoff(lease.pool)
        if self._on_release:
            held = self.clock.now() - lease.acquired_at
            await self._emit(self._on_release, LeaseEventKind.RELEASED, lease, 0.0, held)
        return True

    async def renew(self, lease: Lease, duration: float | None) -> bool:
        """Let a held lease live `duration` more seconds from now (None: until released)."""
        expires_at = None if duration is None else self.clock.now() + duration
        return await self.storage.renew(lease, expires_at)

    async def put_back(self, lease: Lease) -> bool:
        """End one use of a lease: released, or for a session's lease, left bound to its
        session, whose idle countdown starts when its last user is done."""
        if lease.session is None:
            return await self.release(lease)
        users = self._session_users.pop(lease.id, 1) - 1
        if users > 0:
            self._session_users[lease.id] = users
            return True
        if lease.id in self._unbound:
            self._unbound.discard(lease.id)
            return await self.release(lease)
        return await self.renew(lease, lease.idle_ttl)

    async def unbind_session(self, lease: Lease, *, fail: bool) -> None:
        """Part a session from `lease`, whose upstream failed: its next request binds another
        upstream or, with `fail`, fails until the session's idle TTL has passed. The lease
        itself ends when its last user puts it back."""
        fail_for = (lease.idle_ttl or 0.0) if fail else None
        await self.storage.unbind_session(lease, self.clock.now(), fail_for=fail_for)
        self._unbound.add(lease.id)

    def users_of(self, lease: Lease) -> int:
        """How many acquirers are using a session's lease right now."""
        return self._session_users.get(lease.id, 0)

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

    async def report(
        self,
        upstream_id: str,
        outcome: Outcome,
        latency: float | None,
        *,
        source: RecordSource = RecordSource.TRAFFIC,
        detail: str | None = None,
    ) -> HealthUpdate:
        """Feed one attempt's outcome into the upstream's health (which may eject it)."""
        update = await self.storage.record_outcome(
            upstream_id, outcome, latency, self.clock.now(), source=source, detail=detail
        )
        if update.transition is not Transition.NONE:
            self._log_transition(update)
        return update

    async def readmit(self, upstream_id: str) -> Upstream:
        """Lease an ejected upstream again (an active check found it working)."""
        upstream = await self.storage.readmit(upstream_id, self.clock.now())
        log.info("upstream %s re-admitted: it passed its checks", upstream_id)
        self.notify(upstream.pool)
        return upstream

    def notify(self, pool: str) -> None:
        """Capacity may have appeared without a release (upstreams added or re-admitted)."""
        if self._waiters.get(pool):
            asyncio.get_running_loop().create_task(self._handoff(pool), name=f"handoff-{pool}")

    async def sweep(self) -> list[Lease]:
        """Release expired leases and re-admit upstreams whose ejection is over (the
        background sweeper calls this periodically)."""
        for upstream in await self.storage.readmit_due(self.clock.now()):
            log.info("upstream %s re-admitted: its ejection time is over", upstream.id)
            self.notify(upstream.pool)
        if self._panicking:
            await self._check_panic()
        expired = await self.storage.release_expired(self.clock.now())
        for lease in expired:
            self._session_users.pop(lease.id, None)
        for pool in {lease.pool for lease in expired}:
            if self._waiters.get(pool):
                await self._handoff(pool)
        if self._on_release:
            now = self.clock.now()
            for lease in expired:
                held = now - lease.acquired_at
                await self._emit(self._on_release, LeaseEventKind.EXPIRED, lease, 0.0, held)
        return expired

    def waiting(self, pool: str) -> int:
        return len(self._waiters.get(pool, ()))

    # -- internals ----------------------------------------------------------------------------

    async def _wait(
        self, request: LeaseRequest, timeout: float, started: float, *, offer: bool
    ) -> Lease:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(request, loop.create_future())
        queue = self._waiters.setdefault(request.pool, deque())
        queue.append(waiter)
        try:
            if offer:
                await self._handoff(request.pool)
            async with asyncio.timeout(timeout):
                if not self.storage.shared:
                    return await waiter.future
                return await self._poll(waiter, queue)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()  # handed over just as time ran out
            raise NoUpstreamAvailable(
                request.pool,
                waited=time.perf_counter() - started,
                reason=f"every upstream stayed busy for {timeout:g}s",
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                handed = waiter.future.result()
                if handed.uses == 1:  # a session's shared lease is not ours to end
                    await self.release(handed)
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            with suppress(ValueError):
                queue.remove(waiter)
            if not queue and self._waiters.get(request.pool) is queue:
                del self._waiters[request.pool]

    async def _poll(self, waiter: _Waiter, queue: deque[_Waiter]) -> Lease:
        """Wait for a hand-over, and at the head of the line also try now and then: other
        processes release without telling us."""
        while True:
            await asyncio.wait((waiter.future,), timeout=self.poll_interval)
            if waiter.future.done():
                return waiter.future.result()
            if queue[0] is waiter and not waiter.serving:
                # Marked as served, so no hand-off leases for it at the same time.
                waiter.serving = True
                try:
                    lease = await self.storage.acquire(
                        waiter.request, holder=self.instance_id, now=self.clock.now()
                    )
                finally:
                    waiter.serving = False
                if lease is not None:
                    return lease

    async def _handoff(self, pool: str) -> None:
        """Offer freed capacity to the waiters of `pool` in arrival order; the first that can
        use it gets it."""
        queue = self._waiters.get(pool)
        if not queue:
            return
        tried_unfiltered = False
        for waiter in list(queue):
            if waiter.future.done():
                continue
            unfiltered = waiter.request.filters is None and waiter.request.session is None
            if waiter.serving:
                # Another hand-off is leasing for it: those behind it must not overtake it.
                tried_unfiltered |= unfiltered
                continue
            if unfiltered and tried_unfiltered:
                continue  # an unfiltered waiter already found nothing: none will
            tried_unfiltered |= unfiltered
            waiter.serving = True
            try:
                lease = await self.storage.acquire(
                    waiter.request, holder=self.instance_id, now=self.clock.now()
                )
            except CoreError as exc:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
                continue
            finally:
                waiter.serving = False
            if lease is None:
                continue
            if waiter.future.done():  # it gave up while we were leasing for it
                if lease.uses == 1:
                    await self.storage.release(lease)
                continue
            waiter.future.set_result(lease)
            return

    def _log_transition(self, update: HealthUpdate) -> None:
        upstream = update.upstream
        if update.transition is Transition.PANIC:
            if upstream.pool not in self._panicking:
                self._panicking.add(upstream.pool)
                log.warning(
                    "pool %s in panic: upstream %s is failing (%s) but the pool is at its "
                    "ejection limit, so failing upstreams stay in use",
                    upstream.pool,
                    upstream.id,
                    upstream.last_error,
                )
            return
        until = upstream.ejected_until or 0.0
        if upstream.last_error == Outcome.PROXY_AUTH_FAILED.value:
            log.error(
                "upstream %s rejected the credentials configured for it: ejected for %.0fs; "
                "check its URL in the configuration",
                upstream.id,
                until - self.clock.now(),
            )
        else:
            log.warning(
                "upstream %s ejected for %.0fs after %d consecutive failures (last: %s)",
                upstream.id,
                until - self.clock.now(),
                upstream.failure_streak,
                upstream.last_error,
            )

    async def _check_panic(self) -> None:
        now = self.clock.now()
        for pool in list(self._panicking):
            try:
                stats = await self.storage.stats(pool, now)
            except CoreError:
                stats = None
            if stats is None or not stats.panic:
                self._panicking.discard(pool)
                log.warning("pool %s left panic: no failing upstream is kept any more", pool)

    async def _emit(
        self,
        callbacks: list[LeaseCallback],
        kind: LeaseEventKind,
        lease: Lease,
        waited: float,
        held: float,
    ) -> None:
        stats = await self.storage.stats(lease.pool, self.clock.now())
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
            except Exception:
                log.exception("lease sweep failed; trying again in %gs", self.sweep_interval)
