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

__all__ = ["UPSTREAM_ATTRIBUTES", "ImmediateLeasing", "PromptLeasing", "Storage"]

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


class ImmediateLeasing(Protocol):
    """A storage in this process's memory can lease and release without awaiting: the lease
    manager then spares the request path a coroutine chain per lease."""

    def acquire_now(self, request: LeaseRequest, *, holder: str, now: float) -> Lease | None:
        """What `acquire` does, done before returning."""
        ...

    def release_now(self, lease: Lease) -> bool:
        """What `release` does, done before returning."""
        ...

    def renew_now(self, lease: Lease, expires_at: float | None) -> bool:
        """What `renew` does, done before returning."""
        ...


class PromptLeasing(Protocol):
    """A storage whose leases come from statements sent for many callers at once can start an
    acquire without a coroutine: the lease manager then spares the request path a task and a
    coroutine chain per lease. The answer is read from the future with `acquired`."""

    def acquire_soon(
        self, request: LeaseRequest, *, holder: str, now: float
    ) -> asyncio.Future[Any] | None:
        """`acquire` started; None when this one must be awaited (`acquire`). A lease granted
        after the future was cancelled is given back by the storage; a future answered must
        be read with `acquired`, and its lease used or released."""
        ...

    def acquired(self, request: LeaseRequest, pending: asyncio.Future[Any]) -> Lease | None:
        """The lease an `acquire_soon` got, or None when it got none: all busy, or the storage
        could not decide this way (`acquire` decides, and waits). Raises what `acquire`
        raises."""
        ...

    def release_soon(self, lease: Lease) -> asyncio.Future[bool] | None:
        """`release` started, and done whether or not anyone waits for its answer; None when
        this one must be awaited (`release`)."""
        ...


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
