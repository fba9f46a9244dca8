"""`memory://`: the reference storage, embedded in one process.

Everything is plain dicts and the selector indexes of `core.selectors`; no method awaits, so
each one is atomic on the event loop without a lock. Nothing is kept per past lease: a released
lease leaves no trace, so the millionth acquire costs what the first did.
"""

from __future__ import annotations

import heapq
import itertools
import random
import sys
from collections.abc import Iterable
from typing import Any

from core.errors import CatalogError, NoUpstreamAvailable, PoolNotFound, UpstreamNotFound
from core.filters import Filter
from core.models import (
    HealthStatus,
    Lease,
    LeaseRequest,
    Outcome,
    Pool,
    PoolStats,
    Selector,
    Upstream,
)
from core.selectors import Slot, SlotIndex, choose, make_index
from core.storage.interface import UPSTREAM_ATTRIBUTES

__all__ = ["LATENCY_EWMA_ALPHA", "MemoryStorage"]

#: Weight of the newest sample in an upstream's latency EWMA.
LATENCY_EWMA_ALPHA = 0.3
_UNLIMITED = sys.maxsize


class _PoolState:
    __slots__ = (
        "available",
        "by_country",
        "by_scheme",
        "ejected",
        "indexes",
        "leased",
        "leases_held",
        "pool",
        "slots",
        "total_leases",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.slots: dict[str, Slot] = {}
        self.indexes: dict[Selector, SlotIndex] = {}
        self.by_country: dict[str, dict[str, Slot]] = {}
        self.by_scheme: dict[str, dict[str, Slot]] = {}
        self.available = 0
        self.ejected = 0
        self.leased = 0
        self.leases_held = 0
        self.total_leases = 0


class MemoryStorage:
    shared = False

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._pools: dict[str, _PoolState] = {}
        self._slots: dict[str, Slot] = {}
        self._held: dict[str, tuple[Lease, Slot]] = {}
        self._sessions: dict[tuple[str, str, str], Lease] = {}
        # Expiry queue: (expires_at, lease id); `_queued_at` marks the entry that is current.
        self._expiry: list[tuple[float, str]] = []
        self._queued_at: dict[str, float] = {}
        self._lease_ids = itertools.count(1)
        self._ticks = itertools.count(1)
        self._seqs = itertools.count(1)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # -- catalog ------------------------------------------------------------------------------

    async def add_pool(self, pool: Pool) -> None:
        if pool.name in self._pools:
            raise CatalogError(f"pool {pool.name!r} already exists")
        self._pools[pool.name] = _PoolState(pool)

    async def update_pool(self, pool: Pool) -> None:
        state = self._pool_state(pool.name)
        state.pool = pool
        for slot in state.slots.values():
            slot.limit = self._limit_of(slot.upstream, pool)
            self._refresh(state, slot)

    async def remove_pool(self, name: str) -> None:
        state = self._pool_state(name)
        if state.leases_held:
            raise CatalogError(f"pool {name!r} still holds {state.leases_held} leases")
        for upstream_id in state.slots:
            del self._slots[upstream_id]
        del self._pools[name]

    async def get_pool(self, name: str) -> Pool:
        return self._pool_state(name).pool

    async def list_pools(self) -> list[Pool]:
        return [state.pool for state in self._pools.values()]

    async def add_upstreams(self, upstreams: Iterable[Upstream]) -> int:
        batch = list(upstreams)
        seen: set[str] = set()
        for upstream in batch:
            if upstream.pool not in self._pools:
                raise PoolNotFound(upstream.pool)
            if upstream.id in self._slots or upstream.id in seen:
                raise CatalogError(f"upstream {upstream.id!r} already exists")
            seen.add(upstream.id)
        for upstream in batch:
            state = self._pools[upstream.pool]
            slot = Slot(upstream, next(self._seqs), self._limit_of(upstream, state.pool))
            self._slots[upstream.id] = slot
            state.slots[upstream.id] = slot
            self._index_attributes(state, slot)
            if upstream.status is HealthStatus.EJECTED:
                state.ejected += 1
            self._refresh(state, slot)
        return len(batch)

    async def update_upstream(self, upstream_id: str, **changes: Any) -> Upstream:
        unknown = set(changes) - UPSTREAM_ATTRIBUTES
        if unknown:
            raise CatalogError(f"cannot change upstream attributes {sorted(unknown)}")
        slot = self._slot(upstream_id)
        state = self._pools[slot.upstream.pool]
        was_leasable = slot.leasable
        if was_leasable:
            # Leave and re-enter every index, which then re-reads weight and latency.
            self._set_leasable(state, slot, False)
        self._unindex_attributes(state, slot)
        for name, value in changes.items():
            setattr(slot.upstream, name, value)
        if slot.upstream.country is not None:
            slot.upstream.country = slot.upstream.country.upper()
        self._index_attributes(state, slot)
        slot.limit = self._limit_of(slot.upstream, state.pool)
        self._refresh(state, slot)
        return slot.upstream

    async def remove_upstream(self, upstream_id: str) -> None:
        slot = self._slot(upstream_id)
        state = self._pools[slot.upstream.pool]
        slot.retired = True
        self._refresh(state, slot)
        if slot.upstream.status is HealthStatus.EJECTED:
            state.ejected -= 1
        self._unindex_attributes(state, slot)
        del state.slots[upstream_id]
        del self._slots[upstream_id]

    async def get_upstream(self, upstream_id: str) -> Upstream:
        return self._slot(upstream_id).upstream

    async def list_upstreams(self, pool: str) -> list[Upstream]:
        return [slot.upstream for slot in self._pool_state(pool).slots.values()]

    # -- leasing ------------------------------------------------------------------------------

    async def acquire(self, request: LeaseRequest, *, holder: str, now: float) -> Lease | None:
        state = self._pools.get(request.pool)
        if state is None:
            raise PoolNotFound(request.pool)
        if request.session is not None:
            return self._acquire_session(state, request, holder, now)
        slot = self._pick(state, request)
        if slot is None:
            return None
        expires_at = None if request.duration is None else now + request.duration
        return self._grant(state, slot, request, holder, now, expires_at)

    async def release(self, lease: Lease) -> bool:
        entry = self._held.pop(lease.id, None)
        if entry is None:
            return False
        self._drop(*entry)
        return True

    async def renew(self, lease: Lease, expires_at: float | None) -> bool:
        entry = self._held.get(lease.id)
        if entry is None:
            return False
        self._set_expiry(entry[0], expires_at)
        return True

    async def release_expired(self, now: float) -> list[Lease]:
        expired: list[Lease] = []
        queue = self._expiry
        while queue and queue[0][0] <= now:
            queued_at, lease_id = heapq.heappop(queue)
            if self._queued_at.get(lease_id) != queued_at:
                continue  # superseded by an earlier entry, or released
            del self._queued_at[lease_id]
            lease = self._held[lease_id][0]
            if lease.expires_at is None:
                continue
            if lease.expires_at > now:
                self._queue_expiry(lease_id, lease.expires_at)  # renewed since it was queued
                continue
            self._drop(*self._held.pop(lease_id))
            expired.append(lease)
        return expired

    async def list_leases(self, pool: str | None = None) -> list[Lease]:
        return [lease for lease, _ in self._held.values() if pool is None or lease.pool == pool]

    # -- health -------------------------------------------------------------------------------

    async def record_outcome(
        self, upstream_id: str, outcome: Outcome, latency: float | None, now: float
    ) -> Upstream:
        slot = self._slot(upstream_id)
        upstream = slot.upstream
        upstream.checked_at = now
        if outcome is Outcome.OK:
            upstream.failure_streak = 0
            if latency is not None:
                previous = upstream.latency_ewma
                upstream.latency_ewma = (
                    latency
                    if previous is None
                    else previous + LATENCY_EWMA_ALPHA * (latency - previous)
                )
                for index in self._pools[upstream.pool].indexes.values():
                    index.on_latency(slot)
        elif outcome.counts_against_upstream:
            upstream.failure_streak += 1
            upstream.last_error = outcome.value
        elif not outcome.is_target_fault:
            upstream.last_error = outcome.value
        return upstream

    async def eject(self, upstream_id: str, until: float, now: float) -> Upstream:
        slot = self._slot(upstream_id)
        upstream = slot.upstream
        state = self._pools[upstream.pool]
        if upstream.status is not HealthStatus.EJECTED:
            upstream.status = HealthStatus.EJECTED
            state.ejected += 1
        upstream.ejected_until = until
        upstream.times_ejected += 1
        upstream.checked_at = now
        self._refresh(state, slot)
        return upstream

    async def readmit(self, upstream_id: str, now: float) -> Upstream:
        slot = self._slot(upstream_id)
        upstream = slot.upstream
        state = self._pools[upstream.pool]
        if upstream.status is HealthStatus.EJECTED:
            upstream.status = HealthStatus.ACTIVE
            state.ejected -= 1
        upstream.ejected_until = None
        upstream.failure_streak = 0
        upstream.checked_at = now
        self._refresh(state, slot)
        return upstream

    async def stats(self, pool: str, now: float) -> PoolStats:
        state = self._pool_state(pool)
        total = len(state.slots)
        return PoolStats(
            pool=pool,
            total=total,
            active=total - state.ejected,
            available=state.available,
            leased=state.leased,
            ejected=state.ejected,
            leases_held=state.leases_held,
            total_leases=state.total_leases,
            collected_at=now,
        )

    # -- internals ----------------------------------------------------------------------------

    def _pool_state(self, name: str) -> _PoolState:
        state = self._pools.get(name)
        if state is None:
            raise PoolNotFound(name)
        return state

    def _slot(self, upstream_id: str) -> Slot:
        slot = self._slots.get(upstream_id)
        if slot is None:
            raise UpstreamNotFound(upstream_id)
        return slot

    @staticmethod
    def _limit_of(upstream: Upstream, pool: Pool) -> int:
        limit = upstream.max_concurrency
        if limit is None:
            limit = pool.max_concurrency
        return _UNLIMITED if limit is None else limit

    def _index(self, state: _PoolState, selector: Selector) -> SlotIndex:
        index = state.indexes.get(selector)
        if index is None:
            # Built on first use, then kept current: pools pay only for selectors they use.
            index = state.indexes[selector] = make_index(selector, self._rng)
            for slot in state.slots.values():
                if slot.leasable:
                    index.on_available(slot)
        return index

    def _pick(self, state: _PoolState, request: LeaseRequest) -> Slot | None:
        selector = request.selector or state.pool.selector
        if request.filters is None:
            slot = self._index(state, selector).pick()
            if slot is None and state.ejected == len(state.slots):
                reason = "all upstreams are ejected" if state.slots else "the pool has no upstreams"
                raise NoUpstreamAvailable(state.pool.name, waited=0.0, reason=reason)
            return slot
        matching = self._matching(state, request.filters)
        if not matching:
            raise NoUpstreamAvailable(
                state.pool.name, waited=0.0, reason="no active upstream matches the filters"
            )
        return choose(selector, [slot for slot in matching if slot.leasable], self._rng)

    def _matching(self, state: _PoolState, filters: Filter) -> list[Slot]:
        candidates: Iterable[Slot] = state.slots.values()
        narrowest = len(state.slots)
        if filters.country is not None:
            by_country = state.by_country.get(filters.country, {})
            candidates, narrowest = by_country.values(), len(by_country)
        if filters.scheme is not None:
            by_scheme = state.by_scheme.get(filters.scheme.value, {})
            if len(by_scheme) < narrowest:
                candidates = by_scheme.values()
        matches = filters.matches
        return [
            slot
            for slot in candidates
            if slot.upstream.status is HealthStatus.ACTIVE and matches(slot.upstream)
        ]

    def _grant(
        self,
        state: _PoolState,
        slot: Slot,
        request: LeaseRequest,
        holder: str,
        now: float,
        expires_at: float | None,
    ) -> Lease:
        slot.active += 1
        slot.last_leased = next(self._ticks)
        state.leases_held += 1
        state.total_leases += 1
        if slot.active == 1:
            state.leased += 1
        if slot.active >= slot.limit:
            self._set_leasable(state, slot, False)
        else:
            for index in state.indexes.values():
                index.on_load(slot)
        lease = Lease(
            f"lease-{next(self._lease_ids)}",
            slot.upstream,
            state.pool.name,
            request.consumer,
            request.session,
            now,
            expires_at,
            holder,
        )
        self._held[lease.id] = (lease, slot)
        if expires_at is not None:
            self._queue_expiry(lease.id, expires_at)
        return lease

    def _acquire_session(
        self, state: _PoolState, request: LeaseRequest, holder: str, now: float
    ) -> Lease | None:
        assert request.session is not None
        key = (state.pool.name, request.consumer, request.session)
        ttl = state.pool.sticky_ttl if request.session_ttl is None else request.session_ttl
        lease = self._sessions.get(key)
        if lease is not None:
            bound = self._held[lease.id][1]
            alive = lease.expires_at is None or lease.expires_at > now
            if alive and not bound.retired and bound.upstream.status is HealthStatus.ACTIVE:
                lease.uses += 1
                self._set_expiry(lease, now + ttl)
                return lease
            # Idle too long, or its upstream is gone: end it and bind the session anew.
            self._drop(*self._held.pop(lease.id))
        slot = self._pick(state, request)
        if slot is None:
            return None
        lease = self._grant(state, slot, request, holder, now, now + ttl)
        lease.idle_ttl = ttl
        self._sessions[key] = lease
        return lease

    def _drop(self, lease: Lease, slot: Slot) -> None:
        """Undo a grant; the caller has removed the lease from `_held`."""
        state = self._pools[lease.pool]
        self._queued_at.pop(lease.id, None)
        if lease.session is not None:
            key = (lease.pool, lease.consumer, lease.session)
            if self._sessions.get(key) is lease:
                del self._sessions[key]
        slot.active -= 1
        state.leases_held -= 1
        if slot.active == 0:
            state.leased -= 1
        if slot.leasable:
            for index in state.indexes.values():
                index.on_load(slot)
        else:
            self._refresh(state, slot)
        if len(self._expiry) > 2 * len(self._queued_at) + 1024:
            self._compact_expiry()

    def _set_expiry(self, lease: Lease, expires_at: float | None) -> None:
        lease.expires_at = expires_at
        if expires_at is None:
            return
        queued = self._queued_at.get(lease.id)
        # A later expiry is found when the earlier entry comes due; only an earlier one
        # needs an entry of its own.
        if queued is None or expires_at < queued:
            self._queue_expiry(lease.id, expires_at)

    def _queue_expiry(self, lease_id: str, expires_at: float) -> None:
        self._queued_at[lease_id] = expires_at
        heapq.heappush(self._expiry, (expires_at, lease_id))

    def _compact_expiry(self) -> None:
        self._expiry = [(at, lease_id) for lease_id, at in self._queued_at.items()]
        heapq.heapify(self._expiry)

    def _refresh(self, state: _PoolState, slot: Slot) -> None:
        leasable = (
            not slot.retired
            and slot.active < slot.limit
            and slot.upstream.status is HealthStatus.ACTIVE
        )
        if leasable != slot.leasable:
            self._set_leasable(state, slot, leasable)

    def _set_leasable(self, state: _PoolState, slot: Slot, leasable: bool) -> None:
        slot.leasable = leasable
        if leasable:
            state.available += 1
            for index in state.indexes.values():
                index.on_available(slot)
        else:
            state.available -= 1
            for index in state.indexes.values():
                index.on_unavailable(slot)

    @staticmethod
    def _index_attributes(state: _PoolState, slot: Slot) -> None:
        upstream = slot.upstream
        if upstream.country is not None:
            state.by_country.setdefault(upstream.country, {})[upstream.id] = slot
        state.by_scheme.setdefault(upstream.scheme.value, {})[upstream.id] = slot

    @staticmethod
    def _unindex_attributes(state: _PoolState, slot: Slot) -> None:
        upstream = slot.upstream
        if upstream.country is not None:
            state.by_country.get(upstream.country, {}).pop(upstream.id, None)
        state.by_scheme.get(upstream.scheme.value, {}).pop(upstream.id, None)
