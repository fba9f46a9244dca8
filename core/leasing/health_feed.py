"""Outcomes of traffic and of checks fed into the upstreams' health, for the lease manager.

An outcome is written to the storage, which may eject the upstream (logged here, as is a pool
going into panic). While the storage is unavailable, an outcome of traffic through an upstream
leased here is kept (`core.backlog`) and written by the sweep that finds it back. Outcomes
reported without waiting go on in tasks of their own; successes wait a moment for others, so
that a storage writing in transactions takes many in one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from core.backlog import OutcomeWrite
from core.errors import CoreError, StorageUnavailable, UpstreamNotFound
from core.health import HealthUpdate, RecordSource, Transition
from core.leasing.holdings import Holdings
from core.models import Outcome
from core.storage.interface import Storage

__all__ = ["SUCCESS_LINGER", "HealthFeed"]

log = logging.getLogger("proxygate.leasing")

#: Seconds a success reported without waiting (`report_soon`) may wait for others before a
#: storage that writes in transactions takes them, so that many go in one: each transaction
#: locks the upstreams' rows, which lease statements then wait for. A failure never waits,
#: and the successes before it are written first.
SUCCESS_LINGER = 0.25


class HealthFeed:
    def __init__(
        self,
        storage: Storage,
        holdings: Holdings,
        on_storage_down: Callable[[StorageUnavailable], None],
    ) -> None:
        self._storage = storage
        self._holdings = holdings
        self._on_storage_down = on_storage_down
        # Pools kept from ejecting by `max_ejection_percent`, until the sweeper sees them heal.
        self._panicking: set[str] = set()
        # Outcomes reported without waiting (`report_soon`), until the storage took them, and
        # successes waiting to go together (upstream, latency, when), with their timer.
        self._reports: set[asyncio.Task[None]] = set()
        self._successes: list[tuple[str, float | None, float]] = []
        self._successes_timer: asyncio.TimerHandle | None = None

    @property
    def panicking(self) -> bool:
        return bool(self._panicking)

    async def close(self) -> None:
        """Write what was reported without waiting."""
        self.write_successes()
        if self._reports:
            await asyncio.gather(*self._reports)

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
            await asyncio.gather(*self.write_successes())
        now = self._holdings.clock.now() if at is None else at
        try:
            update = await self._storage.record_outcome(
                upstream_id, outcome, latency, now, source=source, detail=detail
            )
        except StorageUnavailable as error:
            known = self._holdings.upstream(upstream_id)
            if source is not RecordSource.TRAFFIC or known is None:
                raise
            kept = OutcomeWrite(upstream_id, outcome, latency, now, source, detail)
            self._holdings.backlog.keep_outcome(kept)
            self._on_storage_down(error)
            return HealthUpdate(known, Transition.NONE)
        self.recorded(update)
        return update

    async def report_soon(self, upstream_id: str, outcome: Outcome, latency: float | None) -> None:
        """`report` a traffic outcome without waiting for a storage that takes its time (a
        request need not wait for a health write to go on): a database's write goes on in a
        task of its own, a success's up to `SUCCESS_LINGER` later together with the others
        reported meanwhile (`close()` waits for those still on their way); memory's is done
        at once, which costs less than a task."""
        if not self._storage.shared:  # in this process's memory
            await self._report_quietly(upstream_id, outcome, latency, None)
            return
        if outcome is not Outcome.OK:
            self._report_in_task(upstream_id, outcome, latency, None)
            return
        self._successes.append((upstream_id, latency, self._holdings.clock.now()))
        if self._successes_timer is None:
            self._successes_timer = asyncio.get_running_loop().call_later(
                SUCCESS_LINGER, self.write_successes
            )

    def write_successes(self) -> list[asyncio.Task[None]]:
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

    def recorded(self, update: HealthUpdate) -> None:
        """An outcome written: its ejection or panic, if any, logged."""
        if update.transition is not Transition.NONE:
            self._log_transition(update)

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
                until - self._holdings.clock.now(),
            )
        else:
            log.warning(
                "upstream %s ejected for %.0fs after %d consecutive failures (last: %s)",
                upstream.id,
                until - self._holdings.clock.now(),
                upstream.failure_streak,
                upstream.last_error,
            )

    async def check_panic(self) -> None:
        """Pools in panic whose failing upstreams all healed leave it."""
        now = self._holdings.clock.now()
        for pool in list(self._panicking):
            try:
                stats = await self._storage.stats(pool, now)
            except CoreError:
                stats = None
            if stats is None or not stats.panic:
                self._panicking.discard(pool)
                log.warning("pool %s left panic: no failing upstream is kept any more", pool)

