"""Leases granted to this process whose answer never came back: given back after an outage.

A grant is one statement. When the database goes away while it runs (a crash, a restart, a
connection cut), the statement may have committed with its answer lost on the way: the lease is
then held in the storage by this process, whose heartbeat goes on, so no sweep ever takes it
back, and nothing here knows of it to give it back. Its upstream carries one lease fewer for
good.

So once the storage answers again, the lease manager looks, every `CONFIRM_AFTER` seconds,
at the leases this process holds that were granted before the outage was noticed (not a
session's, which expires by its own TTL). One that nothing here knows of (not in use, not being
given back, not held ahead by the storage itself) in two looks in a row is given back: an
answer still on its way at the first look is known by the second. The looks go on until no
lease granted before the outage is held any more, so a lease known at one look (being given
back, say) and lost to this process afterwards is still found.
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
        #: Wall time the latest outage was noticed: leases granted until then are looked at
        #: (None: no outage since every such lease was gone).
        self._before: float | None = None
        #: When (monotonic) the last look was, and the leases it found unknown.
        self._last_look: float | None = None
        self._suspects: set[str] = set()

    def outage_noticed(self, at: float) -> None:
        """The storage went away before wall time `at`: grants until then may be unanswered."""
        self._before = at if self._before is None else max(self._before, at)

    async def sweep(self, monotonic_now: float) -> int:
        """Look, if a look is due (raises StorageUnavailable while the storage does not
        answer); how many leases were given back."""
        before = self._before
        if before is None:
            return 0
        last = self._last_look
        if last is not None and monotonic_now - last < CONFIRM_AFTER:
            return 0
        held = await self._held_before(before)
        known = self._known()
        unknown = {lease_id for lease_id in held if lease_id not in known}
        orphans = [held[lease_id] for lease_id in unknown & self._suspects]
        for lease in orphans:
            await self._storage.release(lease)
        self._suspects = unknown.difference(lease.id for lease in orphans)
        self._last_look = monotonic_now
        if len(held) == len(orphans):  # nothing granted before the outage is held any more
            self._before = self._last_look = None
        if orphans:
            log.warning(
                "gave back %d leases granted here whose answers were lost when the storage "
                "went away",
                len(orphans),
            )
        return len(orphans)

    async def _held_before(self, before: float) -> dict[str, Lease]:
        return {
            lease.id: lease
            for lease in await self._storage.list_leases()
            if lease.holder == self._holder
            and lease.session is None
            and lease.acquired_at <= before
        }
