"""Leases granted to this process whose answer never came back: given back after an outage.

A grant is one statement. When the database goes away while it runs (a crash, a restart, a
connection cut), the statement may have committed with its answer lost on the way: the lease is
then held in the storage by this process, whose heartbeat goes on, so no sweep ever takes it
back, and nothing here knows of it to give it back. Its upstream carries one lease fewer for
good.

So once the storage answers again, the lease manager asks it for the leases this process
holds that nothing here knows of (not in use, not being given back, not held ahead by the
storage itself, not a session's, which expires by its own TTL) and that were granted before
the outage was noticed. An answer still on its way when the first listing runs is known by the
next one, `CONFIRM_AFTER` seconds later: only leases unknown both times are given back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.models import Lease
from core.storage.interface import Storage

__all__ = ["CONFIRM_AFTER", "UnansweredGrants"]

log = logging.getLogger("proxygate.leasing")

#: Seconds between the two listings that must both show a lease unknown here.
CONFIRM_AFTER = 2.0


class UnansweredGrants:
    def __init__(self, storage: Storage, holder: str, known: Callable[[], set[str]]) -> None:
        """`known()`: the ids of every lease this process knows it holds."""
        self._storage = storage
        self._holder = holder
        self._known = known
        #: Wall time the earliest outage not yet looked into was noticed (None: none).
        self._before: float | None = None
        #: The first listing: when (monotonic) and the leases it found unknown.
        self._first: tuple[float, set[str]] | None = None

    def outage_noticed(self, at: float) -> None:
        """The storage went away at wall time `at`: grants before then may be unanswered."""
        self._before = at if self._before is None else max(self._before, at)

    async def sweep(self, monotonic_now: float) -> int:
        """Look, once the storage answers again (raises StorageUnavailable while it does not);
        how many leases were given back."""
        before = self._before
        if before is None:
            return 0
        unknown = await self._unknown(before)
        first = self._first
        if first is None:
            self._first = (monotonic_now, set(unknown)) if unknown else None
            if not unknown:
                self._before = None
            return 0
        if monotonic_now - first[0] < CONFIRM_AFTER:
            return 0
        orphans = [lease for lease_id, lease in unknown.items() if lease_id in first[1]]
        for lease in orphans:
            await self._storage.release(lease)
        self._first = None
        self._before = None
        if orphans:
            log.warning(
                "gave back %d leases granted here whose answers were lost when the storage "
                "went away",
                len(orphans),
            )
        return len(orphans)

    async def _unknown(self, before: float) -> dict[str, Lease]:
        held = [
            lease
            for lease in await self._storage.list_leases()
            if lease.holder == self._holder and lease.session is None
        ]
        known = self._known()
        return {
            lease.id: lease
            for lease in held
            if lease.acquired_at <= before and lease.id not in known
        }
