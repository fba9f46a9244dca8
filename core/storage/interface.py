"""The storage protocol: the few operations the lease manager needs, each one atomic.

Every method is a single unit of work, so a SQL adapter can do each in one transaction (acquire
chooses, checks concurrency and records the lease in one step: there is no find-then-lease race
for callers to retry). Times are passed in by the caller, whose clock may be a test's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from core.models import Lease, LeaseRequest, Outcome, Pool, PoolStats, Upstream

__all__ = ["UPSTREAM_ATTRIBUTES", "Storage"]

#: What `update_upstream` may change; the endpoint and the health fields are not among them.
UPSTREAM_ATTRIBUTES = frozenset(
    {
        "country",
        "city",
        "asn",
        "isp",
        "source",
        "tags",
        "weight",
        "max_concurrency",
        "latitude",
        "longitude",
    }
)


class Storage(Protocol):
    #: True when other processes change the same leases, so waiters must poll as well as
    #: listen for local releases.
    shared: bool

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # -- catalog ------------------------------------------------------------------------------

    async def add_pool(self, pool: Pool) -> None:
        """Add a pool. CatalogError if the name is taken."""
        ...

    async def update_pool(self, pool: Pool) -> None:
        """Replace the pool of that name's settings. PoolNotFound if there is none."""
        ...

    async def remove_pool(self, name: str) -> None:
        """Remove a pool and its upstreams. CatalogError while it holds leases."""
        ...

    async def get_pool(self, name: str) -> Pool: ...

    async def list_pools(self) -> list[Pool]: ...

    async def add_upstreams(self, upstreams: Iterable[Upstream]) -> int:
        """Add upstreams in bulk, all or none. CatalogError on a duplicate id or unknown pool."""
        ...

    async def update_upstream(self, upstream_id: str, **changes: Any) -> Upstream:
        """Change the attributes named in `UPSTREAM_ATTRIBUTES`."""
        ...

    async def remove_upstream(self, upstream_id: str) -> None:
        """Stop leasing an upstream. Leases already held on it stay valid until released."""
        ...

    async def get_upstream(self, upstream_id: str) -> Upstream: ...

    async def list_upstreams(self, pool: str) -> list[Upstream]: ...

    # -- leasing ------------------------------------------------------------------------------

    async def acquire(self, request: LeaseRequest, *, holder: str, now: float) -> Lease | None:
        """Lease one upstream of `request.pool` chosen by its selector, or None if all are busy.

        With a session id, the session's live lease is returned (its idle expiry pushed back)
        instead of a new one. Raises PoolNotFound, and NoUpstreamAvailable when no upstream
        could ever match (none in the pool, none passing the filters, all ejected): waiting
        for a release would be in vain.
        """
        ...

    async def release(self, lease: Lease) -> bool:
        """Give a lease back. False if it was not held (released twice, or expired)."""
        ...

    async def renew(self, lease: Lease, expires_at: float | None) -> bool:
        """Move a held lease's expiry. False if it is no longer held."""
        ...

    async def release_expired(self, now: float) -> list[Lease]:
        """Release every lease whose `expires_at` is at or before `now`; return them."""
        ...

    async def list_leases(self, pool: str | None = None) -> list[Lease]: ...

    # -- health -------------------------------------------------------------------------------

    async def record_outcome(
        self, upstream_id: str, outcome: Outcome, latency: float | None, now: float
    ) -> Upstream:
        """Fold one attempt's result into the upstream's health; return the upstream after.

        `ok` resets the failure streak and feeds the latency EWMA; an outcome that counts
        against the upstream lengthens the streak; a target-side outcome changes neither.
        """
        ...

    async def eject(self, upstream_id: str, until: float, now: float) -> Upstream:
        """Stop leasing an upstream until re-admitted (`until` is when it is due back)."""
        ...

    async def readmit(self, upstream_id: str, now: float) -> Upstream: ...

    async def stats(self, pool: str, now: float) -> PoolStats: ...
