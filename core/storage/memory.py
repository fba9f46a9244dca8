"""`memory://`: the reference storage, embedded in one process.

Everything is plain dicts and the selector indexes of `core.selectors`; no method awaits, so
each one is atomic on the event loop without a lock. Nothing is kept per past lease: a released
lease leaves no trace, so the millionth acquire costs what the first did.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import sys
from collections import deque
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from core import health
from core.errors import (
    CatalogError,
    NoUpstreamAvailable,
    PoolNotFound,
    SessionFailed,
    UpstreamNotFound,
)
from core.filters import Filter, restricted_to_country
from core.health import HealthRecord, HealthUpdate, RecordSource, Transition
from core.models import (
    HealthStatus,
    Lease,
    LeaseRequest,
    Outcome,
    Pool,
    PoolStats,
    Selector,
    StickyFailure,
    Upstream,
)
from core.selectors import Slot, SlotIndex, choose, make_index
from core.storage.interface import UPSTREAM_ATTRIBUTES

__all__ = ["MemoryStorage"]

_UNLIMITED: Final = sys.maxsize
_SessionKey = tuple[str, str, str]
# A `HealthRecord`'s fields: a tuple per result is what a hot path can afford.
_HistoryEntry = tuple[float, Outcome, float | None, RecordSource, str | None]


class _Parted(NamedTuple):
    """A session that left a failed upstream, until it binds anew (or, failed, until `until`)."""

    upstream_id: str
    country: str | None
    until: float | None


class _PoolState:
    __slots__ = (
        "available",
        "by_country",
        "by_scheme",
        "ejected",
        "indexes",
        "kept_failing",
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
        #: Active upstreams failing enough to be ejected, kept by the ejection cap (panic).
        self.kept_failing = 0
        self.leased = 0
        self.leases_held = 0
        self.total_leases = 0


class MemoryStorage:
    shared = False

    def __init__(self, *, rng: random.Random | None = None) -> None:
        #: No other process shares these leases, and no database is there to lose.
        self.holder_grace: float | None = None
        self.contact_losses = 0
        self._rng = rng or random.Random()
        self._pools: dict[str, _PoolState] = {}
        self._slots: dict[str, Slot] = {}
        self._held: dict[str, tuple[Lease, Slot]] = {}
        self._sessions: dict[_SessionKey, Lease] = {}
        self._parted: dict[_SessionKey, _Parted] = {}
        # Leases their session has left while in use: released when their last user is done.
        self._unbound: set[str] = set()
        self._history: dict[str, deque[_HistoryEntry]] = {}
        # Expiry queue: (expires_at, lease id); `_queued_at` marks the entry that is current.
        self._expiry: list[tuple[float, str]] = []
        self._queued_at: dict[str, float] = {}
        # Counters as plain ints, not itertools.count: compiled, `+= 1` is an instruction
        # and next() a call through the interpreter's machinery, twice per lease.
        self._last_lease_id = 0
        self._last_tick = 0
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
        state.kept_failing = 0
        for slot in state.slots.values():
            slot.limit = self._limit_of(slot.upstream, pool)
            state.kept_failing += self._kept_failing(state, slot.upstream)
            self._refresh(state, slot)

    async def remove_pool(self, name: str) -> None:
        state = self._pool_state(name)
        if state.leases_held:
            raise CatalogError(f"pool {name!r} still holds {state.leases_held} leases")
        for upstream_id in state.slots:
            del self._slots[upstream_id]
            self._history.pop(upstream_id, None)
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
            state.kept_failing += self._kept_failing(state, upstream)
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
        state.kept_failing -= self._kept_failing(state, slot.upstream)
        self._unindex_attributes(state, slot)
        del state.slots[upstream_id]
        del self._slots[upstream_id]
        self._history.pop(upstream_id, None)

    async def get_upstream(self, upstream_id: str) -> Upstream:
        return self._slot(upstream_id).upstream

    async def list_upstreams(self, pool: str) -> list[Upstream]:
        return [slot.upstream for slot in self._pool_state(pool).slots.values()]

    # -- leasing ------------------------------------------------------------------------------

    async def acquire(self, request: LeaseRequest, *, holder: str, now: float) -> Lease | None:
        return self.acquire_nowait(request, holder=holder, now=now)

    def acquire_nowait(self, request: LeaseRequest, *, holder: str, now: float) -> Lease | None:
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

    def acquired(self, request: LeaseRequest, pending: asyncio.Future[Any]) -> Lease | None:
        """Never asked: `acquire_nowait` answers at once, with no future."""
        raise AssertionError("memory storage leases at once")

    async def release(self, lease: Lease) -> bool:
        return self.release_nowait(lease)

    def release_nowait(self, lease: Lease) -> bool:
        entry = self._held.pop(lease.id, None)
        if entry is None:
            return False
        self._drop(*entry)
        return True

    async def renew(self, lease: Lease, expires_at: float | None) -> bool:
        return self.renew_nowait(lease, expires_at)

    def renew_nowait(self, lease: Lease, expires_at: float | None) -> bool:
        entry = self._held.get(lease.id)
        if entry is None:
            return False
        if expires_at is not None and lease.id in self._unbound:
            del self._held[lease.id]
            self._drop(*entry)
            return False
        self._set_expiry(entry[0], expires_at)
        return True

    async def unbind_session(self, lease: Lease, now: float, *, fail_for: float | None) -> None:
        if lease.session is None:
            return
        key = (lease.pool, lease.consumer, lease.session)
        if self._sessions.get(key) is lease:
            self._unbind(key, lease, now, fail_for)

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
        if self._parted:
            for key, parted in list(self._parted.items()):
                if parted.until is not None and parted.until <= now:
                    del self._parted[key]
        return expired

    async def list_leases(self, pool: str | None = None) -> list[Lease]:
        return [lease for lease, _ in self._held.values() if pool is None or lease.pool == pool]

    def leases_held_ahead(self) -> set[str]:
        return set()  # granted only as asked

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
        slot = self._slot(upstream_id)
        upstream = slot.upstream
        state = self._pools[upstream.pool]
        policy = state.pool.health
        kept_before = self._kept_failing(state, upstream)
        ewma_before = upstream.latency_ewma
        transition = Transition.NONE
        if health.observe(upstream, outcome, latency, now, policy):
            if health.ejection_allowed(len(state.slots), state.ejected, policy):
                until = health.ejection_end(upstream.times_ejected + 1, now, policy)
                self._eject(state, slot, until, now)
                transition = Transition.EJECTED
            else:
                transition = Transition.PANIC
        elif upstream.latency_ewma != ewma_before:
            for index in state.indexes.values():
                index.on_latency(slot)
        state.kept_failing += self._kept_failing(state, upstream) - kept_before
        history = self._history.get(upstream_id)
        if history is None or history.maxlen != policy.history_size:
            history = self._history[upstream_id] = deque(history or (), policy.history_size)
        history.append((now, outcome, latency, source, detail))
        return HealthUpdate(upstream, transition)

    async def eject(self, upstream_id: str, until: float, now: float) -> Upstream:
        slot = self._slot(upstream_id)
        state = self._pools[slot.upstream.pool]
        kept_before = self._kept_failing(state, slot.upstream)
        self._eject(state, slot, until, now)
        state.kept_failing -= kept_before
        return slot.upstream

    async def readmit(self, upstream_id: str, now: float) -> Upstream:
        slot = self._slot(upstream_id)
        self._readmit(self._pools[slot.upstream.pool], slot, now)
        return slot.upstream

    async def readmit_due(self, now: float) -> list[Upstream]:
        due: list[Upstream] = []
        for state in self._pools.values():
            if not state.ejected:
                continue
            for slot in state.slots.values():
                upstream = slot.upstream
                if (
                    upstream.status is HealthStatus.EJECTED
                    and upstream.ejected_until is not None
                    and upstream.ejected_until <= now
                ):
                    self._readmit(state, slot, now)
                    due.append(upstream)
        return due

    async def history(self, upstream_id: str) -> list[HealthRecord]:
        self._slot(upstream_id)
        return [HealthRecord(*entry) for entry in self._history.get(upstream_id, ())]

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
            panic=state.kept_failing > 0,
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
        self._last_tick += 1
        slot.last_leased = self._last_tick
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
            self._next_lease_id(),
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

    def _next_lease_id(self) -> str:
        self._last_lease_id += 1
        return "lease-" + str(self._last_lease_id)

    def _acquire_session(
        self, state: _PoolState, request: LeaseRequest, holder: str, now: float
    ) -> Lease | None:
        assert request.session is not None
        pool = state.pool
        key = (pool.name, request.consumer, request.session)
        ttl = pool.sticky_ttl if request.session_ttl is None else request.session_ttl
        parted = self._parted.get(key)
        if parted is not None and parted.until is not None:
            if parted.until > now:
                raise SessionFailed(pool.name, request.session, parted.upstream_id)
            del self._parted[key]
            parted = None
        lease = self._sessions.get(key)
        if lease is not None:
            bound = self._held[lease.id][1]
            alive = lease.expires_at is None or lease.expires_at > now
            healthy = not bound.retired and bound.upstream.status is HealthStatus.ACTIVE
            if alive and healthy:
                lease.uses += 1
                self._set_expiry(lease, now + ttl)
                return lease
            if not alive:
                self._drop(*self._held.pop(lease.id))  # idle too long: a new session
            else:
                fail = pool.on_sticky_failure is StickyFailure.FAIL
                parted = self._unbind(key, lease, now, lease.idle_ttl if fail else None)
                if fail:
                    raise SessionFailed(pool.name, request.session, parted.upstream_id)
        if (
            parted is not None
            and parted.country is not None
            and pool.on_sticky_failure is StickyFailure.REBIND_MATCHING
        ):
            request = restricted_to_country(request, parted.country)
        slot = self._pick(state, request)
        if slot is None:
            return None
        lease = self._grant(state, slot, request, holder, now, now + ttl)
        lease.idle_ttl = ttl
        if parted is not None:
            lease.rebound_from = parted.upstream_id
            del self._parted[key]
        self._sessions[key] = lease
        return lease

    def _unbind(
        self, key: _SessionKey, lease: Lease, now: float, fail_for: float | None
    ) -> _Parted:
        del self._sessions[key]
        upstream = lease.upstream
        parted = self._parted[key] = _Parted(
            upstream.id, upstream.country, None if fail_for is None else now + fail_for
        )
        if lease.expires_at is None:
            self._unbound.add(lease.id)  # in use: its last user's renew releases it
        else:
            self._drop(*self._held.pop(lease.id))
        return parted

    def _eject(self, state: _PoolState, slot: Slot, until: float, now: float) -> None:
        upstream = slot.upstream
        if upstream.status is not HealthStatus.EJECTED:
            upstream.status = HealthStatus.EJECTED
            state.ejected += 1
        upstream.ejected_until = until
        upstream.times_ejected += 1
        upstream.checked_at = now
        self._refresh(state, slot)

    def _readmit(self, state: _PoolState, slot: Slot, now: float) -> None:
        upstream = slot.upstream
        if upstream.status is HealthStatus.EJECTED:
            upstream.status = HealthStatus.ACTIVE
            state.ejected -= 1
        elif self._kept_failing(state, upstream):
            state.kept_failing -= 1
        upstream.ejected_until = None
        upstream.failure_streak = 0
        upstream.checked_at = now
        self._refresh(state, slot)

    @staticmethod
    def _kept_failing(state: _PoolState, upstream: Upstream) -> int:
        return int(
            upstream.status is HealthStatus.ACTIVE
            and upstream.failure_streak >= state.pool.health.failures_to_eject
        )

    def _drop(self, lease: Lease, slot: Slot) -> None:
        """Undo a grant; the caller has removed the lease from `_held`."""
        state = self._pools[lease.pool]
        self._queued_at.pop(lease.id, None)
        self._unbound.discard(lease.id)
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
