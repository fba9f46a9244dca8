"""The storage going away and coming back, for the lease manager.

While the storage is unavailable, acquiring fails at once and giving back is kept
(`core.backlog`). Once a sweep goes through again: grants whose answers the outage cut off are
looked for (`core.leasing.unanswered`), and if the silence outlasted the storage's holder grace,
other processes may have judged this one dead and taken its leases back: the leases in use
here are re-validated, and those gone are forgotten (their connections go on; their upstreams
may carry more than `max_concurrency` until they end) and counted in `lost_leases`.
"""

from __future__ import annotations

import logging
import time

from core.errors import StorageUnavailable
from core.leasing.holdings import Holdings
from core.leasing.unanswered import UnansweredGrants
from core.storage.interface import Storage

__all__ = ["Outages"]

log = logging.getLogger("proxygate.leasing")


class Outages:
    def __init__(self, storage: Storage, holdings: Holdings) -> None:
        self._storage = storage
        self._holdings = holdings
        #: Leases in use here that other processes took back while the storage was out of
        #: reach for longer than its holder grace.
        self.lost_leases = 0
        # Monotonic: when the storage was found unavailable (None: it answers), and when a
        # sweep last went through.
        self._down_since: float | None = None
        self._last_sweep: float | None = None
        #: The storage's `contact_losses` as the last sweep that went through saw it.
        self._contact_losses = 0
        self._unanswered = UnansweredGrants(storage, holdings.holder, holdings.known)

    async def look_for_unanswered(self) -> None:
        """Give back what an outage granted here without an answer (`UnansweredGrants`)."""
        await self._unanswered.sweep(time.monotonic())

    def down(self, error: StorageUnavailable) -> None:
        """A call found the storage unavailable."""
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        log.warning(
            "storage unavailable (%s): leasing fails until it answers; releases and outcomes "
            "are kept meanwhile",
            str(error).partition("\n")[0],
        )

    async def answered(self, started: float) -> None:
        """A sweep went through: end an outage, and after a long silence check which of the
        leases in use here are still ours."""
        down_since, self._down_since = self._down_since, None
        if down_since is not None:
            log.info("storage answers again after %.1fs", time.monotonic() - down_since)
        # The storage's count of calls that found the database gone tells of outages that
        # only calls other than the manager's own met (an acquire failing on the request
        # path, between two sweeps).
        losses = self._storage.contact_losses
        if down_since is not None or losses != self._contact_losses:
            self._contact_losses = losses
            # Anything granted until now may have lost its answer on the way.
            self._unanswered.outage_noticed(self._holdings.clock.now())
        last = self._last_sweep
        grace = self._storage.holder_grace
        if grace is not None and last is not None and started - last > grace:
            await self._revalidate(started - last)
        self._last_sweep = started  # only now: a re-validation that failed is tried again

    async def _revalidate(self, silence: float) -> None:
        # Judged: leases in use before the listing; any acquired during it is ours anyway.
        holdings = self._holdings
        candidates = holdings.in_use()
        ours = {
            lease.id
            for lease in await self._storage.list_leases()
            if lease.holder == self._holdings.holder
        }
        lost = [i for i in candidates if holdings.is_in_use(i) and i not in ours]
        holdings.lose(lost)
        self.lost_leases += len(lost)
        if lost:
            log.warning(
                "%d leases in use here were taken back by other processes while the storage "
                "was out of reach for %.0fs (longer than its holder grace); their connections "
                "go on, so their upstreams may carry more than max_concurrency until they end",
                len(lost),
                silence,
            )
