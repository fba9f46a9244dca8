"""The lease manager: the one door through which the gateway takes and gives back upstreams.

It adds to storage what storage cannot do alone: waiting in line when every upstream is busy
(a release hands its capacity straight to the first waiter that can use it, so newcomers never
overtake the line), sessions that outlive a request, callbacks, and the sweeper that takes back
expired leases.

While a shared storage is unavailable (StorageUnavailable), acquiring fails at once, but giving
back never fails: releases, sessions' idle countdowns and traffic outcomes are kept
(`core.backlog`) and written by the first sweep that finds the storage answering again. If that
took longer than the storage's `holder_grace`, other processes may have judged this one dead and
taken its leases back: the sweep then re-validates the leases in use here, forgets those that
are gone (their connections go on; their upstreams may carry more than `max_concurrency` until
they end) and counts them in `lost_leases`.

What leasing and giving back do without awaiting (on every plain HTTP request the gateway
carries from its callbacks) lives at the manager's desk (`core.lease_desk`), compiled with the
request path; the manager does everything that awaits, on the desk's bookkeeping.
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
from typing import Any

from core.backlog import LeaseWrite, OutcomeWrite
from core.clock import Clock, SystemClock
from core.errors import CoreError, NoUpstreamAvailable, StorageUnavailable, UpstreamNotFound
from core.health import HealthUpdate, RecordSource, Transition
from core.lease_desk import LeaseDesk
from core.models import Lease, LeaseRequest, Outcome, PoolStats, Upstream
from core.storage.interface import Storage
from core.unanswered import UnansweredGrants

__all__ = ["LeaseCallback", "LeaseEvent", "LeaseEventKind", "LeaseManager"]

log = logging.getLogger("proxygate.leasing")

#: Seconds a success reported without waiting (`report_soon`) may wait for others before a
#: storage that writes in transactions takes them, so that many go in one: each transaction
#: locks the upstreams' rows, which lease statements then wait for. A failure never waits,
#: and the successes before it are written first.
SUCCESS_LINGER = 0.25


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
        #: Leasing and giving back without awaiting, and the bookkeeping shared with it.
        self.desk = desk = LeaseDesk(
            storage,
            clock or SystemClock(),
            instance_id or f"gw-{secrets.token_hex(6)}",
            self._storage_down,
        )
        self.sweep_interval = sweep_interval
        #: How often a waiter re-tries on its own when other processes share the storage.
        self.poll_interval = poll_interval
        #: Leases in use here that other processes took back while the storage was out of
        #: reach for longer than its holder grace.
        self.lost_leases = 0
        # The desk's own objects, shared (never replaced): see `LeaseDesk` for each.
        self._waiters: dict[str, deque[_Waiter]] = desk.waiters
        self._session_users = desk.session_users
        self._unbound = desk.unbound
        self._on_acquire: list[LeaseCallback] = desk.on_acquire
        self._on_release: list[LeaseCallback] = desk.on_release
        self._releasing = desk.releasing
        self._in_use = desk.in_use
        self._upstreams = desk.upstreams
        self._lost = desk.lost
        self._backlog = desk.backlog
        # Pools kept from ejecting by `max_ejection_percent`, until the sweeper sees them heal.
        self._panicking: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # Outcomes reported without waiting (`report_soon`), until the storage took them, and
        # successes waiting to go together (upstream, latency, when), with their timer.
        self._reports: set[asyncio.Task[None]] = set()
        # Hand-offs to waiters started from `notify` (ended at `close`).
        self._handoffs: set[asyncio.Task[None]] = set()
        self._successes: list[tuple[str, float | None, float]] = []
        self._successes_timer: asyncio.TimerHandle | None = None
        # Monotonic: when the storage was found unavailable (None: it answers), and when a
        # sweep last went through.
        self._down_since: float | None = None
        self._last_sweep: float | None = None
        #: The storage's `contact_losses` as the last sweep that went through saw it.
        self._contact_losses = 0
        self._unanswered = UnansweredGrants(storage, desk.instance_id, self._known_leases)

    @property
    def clock(self) -> Clock:
        return self.desk.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self.desk.clock = clock

    @property
    def instance_id(self) -> str:
        return self.desk.instance_id

    @property
    def double_releases(self) -> int:
        """Releases of leases already released (or expired): each changed nothing."""
        return self.desk.double_releases

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
        for handoff in list(self._handoffs):
            handoff.cancel()
        if self._handoffs:
            await asyncio.gather(*self._handoffs, return_exceptions=True)
        self._write_successes()
        if self._reports:
            await asyncio.gather(*self._reports)
        if self._releasing:
            await asyncio.wait(self._releasing)
        if self._backlog:
            try:
                await self._apply_backlog()
            except StorageUnavailable:
                log.warning(
                    "closing with the storage unavailable: %d lease writes and %d outcomes "
                    "not written; other processes' sweeps take the leases back once this "
                    "holder has been silent for the storage's holder grace",
                    len(self._backlog.leases),
                    len(self._backlog.outcomes),
                )

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
        if self.desk.immediate is not None and self.desk.may_skip_the_line(request):
            lease = self.acquire_now(request)
            if lease is not None:
                return lease
            offer = False  # the storage just said all are busy: into the line
        elif request.session is not None or not self._waiters.get(request.pool):
            lease = await self.storage.acquire(
                request, holder=self.instance_id, now=self.clock.now()
            )
            if lease is not None:
                # A session already bound is not new capacity: it never queues.
                if lease.uses > 1 or not self._waiters.get(request.pool):
                    return await self._acquired(lease, 0.0)
                # A fresh grant while others wait: offered to them first, then to us, in line.
                await self._return_grant(lease)
            else:
                offer = False
        started = time.perf_counter()
        lease = await self._wait(request, timeout, started, offer=offer)
        return await self._acquired(lease, time.perf_counter() - started)

    def acquire_now(self, request: LeaseRequest) -> Lease | None:
        """`LeaseDesk.acquire_now`: a lease without awaiting, or None (`acquire` does it all)."""
        return self.desk.acquire_now(request)

    def acquire_soon(self, request: LeaseRequest) -> asyncio.Future[Any] | None:
        """`LeaseDesk.acquire_soon`: leasing started without awaiting, or None."""
        return self.desk.acquire_soon(request)

    def acquired_soon(self, request: LeaseRequest, pending: asyncio.Future[Any]) -> Lease | None:
        """`LeaseDesk.acquired_soon`: the lease `acquire_soon` got, or None."""
        return self.desk.acquired_soon(request, pending)

    def put_back_now(self, lease: Lease) -> bool:
        """`LeaseDesk.put_back_now`: given back without awaiting, or False (`put_back` does
        it all)."""
        return self.desk.put_back_now(lease)

    async def _acquired(self, lease: Lease, waited: float) -> Lease:
        self.desk.hold(lease)
        if lease.session is not None:
            self._session_users[lease.id] = self._session_users.get(lease.id, 0) + 1
            if lease.id in self._backlog.leases or self._backlog.lock.locked():
                async with self._backlog.lock:  # the kept countdown is written first
                    self._backlog.forget(lease.id)
            try:
                await self.storage.renew(lease, None)  # in use: no idle countdown
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
        self._session_users.pop(lease.id, None)
        self._unbound.discard(lease.id)
        self._in_use.pop(lease.id, None)
        self._backlog.forget(lease.id)  # this release is the lease's last word now
        lost = lease.id in self._lost
        self._lost.discard(lease.id)
        try:
            released = await self.storage.release(lease)
        except StorageUnavailable as error:
            self.desk.keep(LeaseWrite(lease, release=True), error)
            return True
        if lost:  # taken back by another process: nothing was ours to release
            return False
        if not released:
            self.desk.released_twice(lease)
            return False
        await self._released(lease, True)
        return True

    async def _released(self, lease: Lease, released: bool) -> None:
        """Capacity came back: to the waiters first, then the callbacks hear of it."""
        if not released:
            return
        if self._waiters.get(lease.pool):
            await self._handoff(lease.pool)
        if self._on_release:
            held = self.clock.now() - lease.acquired_at
            await self._emit(self._on_release, LeaseEventKind.RELEASED, lease, 0.0, held)

    async def _return_grant(self, lease: Lease) -> None:
        """Give back a fresh grant nobody used (kept for later if the storage is unavailable)."""
        try:
            await self.storage.release(lease)
        except StorageUnavailable as error:
            self.desk.keep(LeaseWrite(lease, release=True), error)

    async def renew(self, lease: Lease, duration: float | None) -> bool:
        """Let a held lease live `duration` more seconds from now (None: until released)."""
        expires_at = None if duration is None else self.clock.now() + duration
        return await self.storage.renew(lease, expires_at)

    async def put_back(self, lease: Lease) -> bool:
        """End one use of a lease: released, or for a session's lease, left bound to its
        session, whose idle countdown starts when its last user is done."""
        if lease.session is None:
            return await self.release(lease)
        if not self.desk.last_session_user(lease):
            return True
        if lease.id in self._unbound:
            self._unbound.discard(lease.id)
            return await self.release(lease)
        expires_at = self.desk.idle_until(lease)
        try:
            return await self.storage.renew(lease, expires_at)
        except StorageUnavailable as error:
            self.desk.keep(LeaseWrite(lease, release=False, expires_at=expires_at), error)
            return True

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
        at: float | None = None,
    ) -> HealthUpdate:
        """Feed one attempt's outcome (`at` a time other than now) into the upstream's health
        (which may eject it).

        While the storage is unavailable, an outcome of traffic through an upstream leased
        here is kept for later, and the answer is the upstream as last seen, unchanged; any
        other report raises StorageUnavailable.
        """
        if self._successes and at is None:
            # Successes reported before this must not land after it (a success clears the
            # failure streak this one may be adding to).
            await asyncio.gather(*self._write_successes())
        now = self.clock.now() if at is None else at
        try:
            update = await self.storage.record_outcome(
                upstream_id, outcome, latency, now, source=source, detail=detail
            )
        except StorageUnavailable as error:
            known = self._upstreams.get(upstream_id)
            if source is not RecordSource.TRAFFIC or known is None:
                raise
            kept = OutcomeWrite(upstream_id, outcome, latency, now, source, detail)
            self._backlog.keep_outcome(kept)
            self._storage_down(error)
            return HealthUpdate(known, Transition.NONE)
        self._recorded(update)
        return update

    async def report_soon(self, upstream_id: str, outcome: Outcome, latency: float | None) -> None:
        """`report` a traffic outcome without waiting for a storage that takes its time (a
        request need not wait for a health write to go on): a database's write goes on in a
        task of its own, a success's up to `SUCCESS_LINGER` later together with the others
        reported meanwhile (`close()` waits for those still on their way); memory's is done
        at once, which costs less than a task."""
        if self.desk.immediate:
            await self._report_quietly(upstream_id, outcome, latency, None)
            return
        if outcome is not Outcome.OK:
            self._report_in_task(upstream_id, outcome, latency, None)
            return
        self._successes.append((upstream_id, latency, self.clock.now()))
        if self._successes_timer is None:
            self._successes_timer = asyncio.get_running_loop().call_later(
                SUCCESS_LINGER, self._write_successes
            )

    def _write_successes(self) -> list[asyncio.Task[None]]:
        """Send the successes waiting, each as reported (in one loop turn: one transaction)."""
        if self._successes_timer is not None:
            self._successes_timer.cancel()
            self._successes_timer = None
        successes, self._successes = self._successes, []
        return [
            self._report_in_task(upstream_id, Outcome.OK, latency, at)
            for upstream_id, latency, at in successes
        ]

    def _report_in_task(
        self, upstream_id: str, outcome: Outcome, latency: float | None, at: float | None
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(
            self._report_quietly(upstream_id, outcome, latency, at), name="report-outcome"
        )
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)
        return task

    async def _report_quietly(
        self, upstream_id: str, outcome: Outcome, latency: float | None, at: float | None
    ) -> None:
        try:
            await self.report(upstream_id, outcome, latency, at=at)
        except UpstreamNotFound:
            pass  # removed meanwhile: its health is nobody's concern any more
        except Exception:
            log.warning("outcome for upstream %s not recorded", upstream_id, exc_info=True)

    def _recorded(self, update: HealthUpdate) -> None:
        if update.transition is not Transition.NONE:
            self._log_transition(update)

    async def readmit(self, upstream_id: str) -> Upstream:
        """Lease an ejected upstream again (an active check found it working)."""
        upstream = await self.storage.readmit(upstream_id, self.clock.now())
        log.info("upstream %s re-admitted: it passed its checks", upstream_id)
        self.notify(upstream.pool)
        return upstream

    def notify(self, pool: str) -> None:
        """Capacity may have appeared without a release (upstreams added or re-admitted)."""
        if self._waiters.get(pool):
            task = asyncio.get_running_loop().create_task(
                self._handoff(pool), name=f"handoff-{pool}"
            )
            self._handoffs.add(task)
            task.add_done_callback(self._handoffs.discard)

    async def sweep(self) -> list[Lease]:
        """Write what was kept while the storage was unavailable, release expired leases and
        re-admit upstreams whose ejection is over (the background sweeper calls this
        periodically). Raises StorageUnavailable while the storage is."""
        started = time.monotonic()
        if self._backlog:
            await self._apply_backlog()
        for upstream in await self.storage.readmit_due(self.clock.now()):
            log.info("upstream %s re-admitted: its ejection time is over", upstream.id)
            self.notify(upstream.pool)
        if self._panicking:
            await self._check_panic()
        expired = await self.storage.release_expired(self.clock.now())
        for lease in expired:
            self._session_users.pop(lease.id, None)
            self._in_use.pop(lease.id, None)
            self._backlog.forget(lease.id)
        await self._storage_answers(started)
        await self._unanswered.sweep(time.monotonic())
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
                    await self._return_grant(lease)
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
        try:
            stats = await self.storage.stats(lease.pool, self.clock.now())
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

    def _storage_down(self, error: StorageUnavailable) -> None:
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        log.warning(
            "storage unavailable (%s): leasing fails until it answers; releases and outcomes "
            "are kept meanwhile",
            str(error).partition("\n")[0],
        )

    async def _apply_backlog(self) -> None:
        kept, dropped = len(self._backlog), self._backlog.dropped_outcomes
        await self._backlog.apply(self.storage, self._released, self._recorded)
        log.info("wrote %d releases and outcomes kept while the storage was unavailable", kept)
        if dropped:
            log.warning("%d outcomes were dropped while the storage was unavailable", dropped)
            self._backlog.dropped_outcomes = 0

    async def _storage_answers(self, started: float) -> None:
        """A sweep went through: end an outage, and after a long silence check which of the
        leases in use here are still ours."""
        outage = self._down_since is not None
        if self._down_since is not None:
            log.info("storage answers again after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
        # A storage that counts its lost contacts tells of outages only calls that were not
        # the manager's own met (an acquire failing on the request path, between two sweeps).
        losses: int = getattr(self.storage, "contact_losses", 0)
        if outage or losses != self._contact_losses:
            self._contact_losses = losses
            # Anything granted until now may have lost its answer on the way.
            self._unanswered.outage_noticed(self.clock.now())
        last = self._last_sweep
        grace: float | None = getattr(self.storage, "holder_grace", None)
        if grace is not None and last is not None and started - last > grace:
            await self._revalidate(started - last)
        self._last_sweep = started  # only now: a re-validation that failed is tried again

    def _known_leases(self) -> set[str]:
        """Every lease this process knows it holds: in use, being given back, or held ahead by
        the storage (`leases_held_ahead`, where the storage grants ahead of requests)."""
        known = set(self._in_use)
        known.update(self._backlog.leases)
        known.update(lease.id for lease in self._releasing.values())
        held_ahead = getattr(self.storage, "leases_held_ahead", None)
        if held_ahead is not None:
            known.update(held_ahead())
        return known

    async def _revalidate(self, silence: float) -> None:
        # Judged: leases in use before the listing; any acquired during it is ours anyway.
        candidates = list(self._in_use)
        ours = {
            lease.id
            for lease in await self.storage.list_leases()
            if lease.holder == self.instance_id
        }
        lost = [i for i in candidates if i in self._in_use and i not in ours]
        for lease_id in lost:
            del self._in_use[lease_id]
            self._session_users.pop(lease_id, None)
            self._unbound.discard(lease_id)
            self._backlog.forget(lease_id)
            self._lost.add(lease_id)
        self.lost_leases += len(lost)
        if lost:
            log.warning(
                "%d leases in use here were taken back by other processes while the storage "
                "was out of reach for %.0fs (longer than its holder grace); their connections "
                "go on, so their upstreams may carry more than max_concurrency until they end",
                len(lost),
                silence,
            )
