"""The storage protocol: the few operations the lease manager needs, each one atomic.

Every method is a single unit of work, so a SQL adapter can do each in one transaction (acquire
chooses, checks concurrency and records the lease in one step: there is no find-then-lease race
for callers to retry). Times are passed in by the caller, whose clock may be a test's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Protocol

from core.health import HealthRecord, HealthUpdate, RecordSource
from core.models import Lease, LeaseRequest, Outcome, Pool, PoolStats, Upstream

__all__ = ["UPSTREAM_ATTRIBUTES", "NowaitLeasing", "Storage"]

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


class NowaitLeasing(Protocol):
    """Leasing and giving back without awaiting, where a storage can: at once (one in this
    process's memory), or by a statement sent for many callers together, whose answer a
    future brings (read with `acquired`). The lease manager then spares the request path a
    coroutine chain per lease. None always means: nothing done, the awaited call decides."""

    def acquire_nowait(
        self, request: LeaseRequest, *, holder: str, now: float
    ) -> Lease | asyncio.Future[Any] | None:
        """`acquire` done (the lease), started (a future: a lease granted after it was
        cancelled is given back by the storage, and an answered one must be read with
        `acquired`, its lease used or released), or not done (None: all busy, or a request
        this way cannot serve). Raises what `acquire` raises. A session's lease granted at
        once can be renewed at once (`renew_nowait`)."""
        ...

    def acquired(self, request: LeaseRequest, pending: asyncio.Future[Any]) -> Lease | None:
        """The lease an `acquire_nowait` future brought, or None when it brought none: all
        busy, or the storage could not decide this way. Raises what `acquire` raises."""
        ...

    def release_nowait(self, lease: Lease) -> bool | asyncio.Future[bool] | None:
        """`release` done (whether the lease was held), started (done whether or not anyone
        waits for its answer), or not done (None)."""
        ...

    def renew_nowait(self, lease: Lease, expires_at: float | None) -> bool | None:
        """`renew` done, or not done (None)."""
        ...


class Storage(Protocol):
    #: True when other processes change the same leases, so waiters must poll as well as
    #: listen for local releases.
    shared: bool

    @property
    def holder_grace(self) -> float | None:
        """Seconds a holder may be silent before other processes take its leases back (None
        where no other process shares the leases)."""
        ...

    @property
    def contact_losses(self) -> int:
        """Calls that found the database gone, all told (0 where there is none to lose): the
        lease manager looks for grants whose answers an outage cut off whenever this moves."""
        ...

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

        With a session id, the session's live lease is returned (its `uses` counted, its idle
        expiry pushed back) instead of a new one. A session whose upstream is ejected or
        removed follows the pool's `on_sticky_failure`: `rebind` binds it to another upstream,
        `rebind_matching` to another with the failed one's country (the new lease's
        `rebound_from` names the failed upstream), `fail` raises SessionFailed until the
        session's idle TTL has passed. A session that was `unbind_session`-ed binds anew the
        same way.

        Raises PoolNotFound, and NoUpstreamAvailable when no upstream could ever match (none in
        the pool, none passing the filters, all ejected): waiting for a release would be in
        vain.
        """
        ...

    async def release(self, lease: Lease) -> bool:
        """Give a lease back. False if it was not held (released twice, or expired)."""
        ...

    async def renew(self, lease: Lease, expires_at: float | None) -> bool:
        """Move a held lease's expiry. False if it is no longer held.

        A session's lease that its session has left (`unbind_session`) is released instead
        when given an expiry (its last user is done with it), and False returned.
        """
        ...

    async def unbind_session(self, lease: Lease, now: float, *, fail_for: float | None) -> None:
        """Part a session from its lease, whose upstream failed.

        The session's next acquire binds anew (its lease's `rebound_from` set), or, with
        `fail_for`, raises SessionFailed for that many seconds. The lease stays held while in
        use (no expiry set) and is released at once otherwise.
        """
        ...

    async def release_expired(self, now: float) -> list[Lease]:
        """Release every lease whose `expires_at` is at or before `now`; return them. Failed
        sessions whose time is up are forgotten too."""
        ...

    async def list_leases(self, pool: str | None = None) -> list[Lease]: ...

    def leases_held_ahead(self) -> set[str]:
        """The ids of the leases this process holds that the storage granted ahead of
        requests and has not handed out yet."""
        ...

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
        """Fold one attempt's result into the upstream's health, under its pool's policy.

        In one step: `core.health.observe` updates the health fields; a result that calls for
        ejection ejects the upstream until `core.health.ejection_end` if
        `core.health.ejection_allowed` (else the transition is PANIC and it stays); the result
        is appended to the upstream's history, which keeps the pool's `history_size` newest.
        """
        ...

    async def eject(self, upstream_id: str, until: float, now: float) -> Upstream:
        """Stop leasing an upstream until re-admitted (`until` is when it is due back).

        Counts as one more ejection (`times_ejected`), whatever the cap: callers that must
        respect `max_ejection_percent` check `ejection_allowed` first.
        """
        ...

    async def readmit(self, upstream_id: str, now: float) -> Upstream:
        """Lease an ejected upstream again (its failure streak starts over)."""
        ...

    async def readmit_due(self, now: float) -> list[Upstream]:
        """Re-admit every upstream whose ejection ended at or before `now`; return them."""
        ...

    async def history(self, upstream_id: str) -> list[HealthRecord]:
        """The upstream's latest results, oldest first."""
        ...

    async def stats(self, pool: str, now: float) -> PoolStats: ...
