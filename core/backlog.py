"""Writes the lease manager could not make while its storage was unavailable, kept in order
until the storage answers again.

A lease's last word is kept per lease (a release, or a session's idle countdown), so there is at
most one per lease this process holds, and no lease is granted while the storage is unavailable:
that part is bounded by the leases held when it went away and is never dropped (a release the
caller was told of must happen, or the upstream stays leased to a live holder for good). Health
outcomes are advice, not acknowledged writes: at most `MAX_OUTCOMES` are kept, the oldest
dropped (and counted) beyond that.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.errors import CoreError, StorageUnavailable
from core.health import HealthUpdate, RecordSource
from core.models import Lease, Outcome
from core.storage.interface import Storage

__all__ = ["MAX_OUTCOMES", "Backlog", "LeaseWrite", "OutcomeWrite"]

MAX_OUTCOMES = 10_000


@dataclass(slots=True, frozen=True)
class LeaseWrite:
    """Release `lease`, or (`release` False) let it expire at `expires_at`."""

    lease: Lease
    release: bool
    expires_at: float | None = None


@dataclass(slots=True, frozen=True)
class OutcomeWrite:
    upstream_id: str
    outcome: Outcome
    latency: float | None
    now: float
    source: RecordSource
    detail: str | None


class Backlog:
    def __init__(self, max_outcomes: int = MAX_OUTCOMES) -> None:
        self.leases: dict[str, LeaseWrite] = {}
        self.outcomes: deque[OutcomeWrite] = deque()
        self.max_outcomes = max_outcomes
        self.dropped_outcomes = 0
        #: Held while the backlog is applied: a lease granted again meanwhile waits, so its
        #: fresh state is written after the kept one, not before.
        self.lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self.leases) + len(self.outcomes)

    def keep_lease(self, write: LeaseWrite) -> None:
        """Keep `write` as its lease's last word (in place of an earlier one, moved last)."""
        self.leases.pop(write.lease.id, None)
        self.leases[write.lease.id] = write

    def keep_outcome(self, write: OutcomeWrite) -> None:
        if len(self.outcomes) >= self.max_outcomes:
            self.outcomes.popleft()
            self.dropped_outcomes += 1
        self.outcomes.append(write)

    def forget(self, lease_id: str) -> None:
        """A newer word on the lease came through: the kept one is stale."""
        self.leases.pop(lease_id, None)

    async def apply(
        self,
        storage: Storage,
        released: Callable[[Lease, bool], Awaitable[None]],
        recorded: Callable[[HealthUpdate], None],
    ) -> int:
        """Write everything kept, oldest first; how many were written. The first failure is
        raised (StorageUnavailable, most likely) with it and all after it still kept."""
        done = 0
        # Not `async with`: compiled, a suspension in its exit (which runs as an exception
        # handler) would see other tasks' exceptions (see tests/test_compiled.py).
        await self.lock.acquire()
        try:
            while self.leases:
                write = next(iter(self.leases.values()))
                if write.release:
                    was_held = await storage.release(write.lease)
                else:
                    await storage.renew(write.lease, write.expires_at)
                if self.leases.get(write.lease.id) is write:
                    del self.leases[write.lease.id]
                done += 1
                if write.release:
                    await released(write.lease, was_held)
            while self.outcomes:
                kept = self.outcomes[0]
                try:
                    update = await storage.record_outcome(
                        kept.upstream_id,
                        kept.outcome,
                        kept.latency,
                        kept.now,
                        source=kept.source,
                        detail=kept.detail,
                    )
                except StorageUnavailable:
                    raise
                except CoreError:  # its upstream was removed meanwhile: nothing to tell
                    update = None
                self.outcomes.popleft()
                done += 1
                if update is not None:
                    recorded(update)
        finally:
            self.lock.release()
        return done
