"""Random acquire / release / renew / expire / eject sequences never break the books.

Invariant after every step: the leases a storage lists per upstream are within the upstream's
limit, and the pool's stats agree with them.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from core.errors import NoUpstreamAvailable
from core.filters import Filter
from core.models import HealthStatus, Lease, LeaseRequest, Pool, Selector
from core.storage.interface import Storage
from tests.core.conftest import ADAPTERS, upstream

T = TypeVar("T")
NOW = 1_700_000_000.0
POOL_LIMIT = 2
#: Upstream 0 allows one lease, the rest the pool's two; odd ones are in AR, even ones in US.
SIZE = 5


class LeasingMachine(RuleBasedStateMachine):
    adapter = "memory"
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.storage: Storage = ADAPTERS[self.adapter]()
        self.now = NOW
        self.granted: set[str] = set()
        #: Leases a session left for another upstream (theirs was ejected): still held by
        #: their user until put back, but no longer the session's.
        self.parted: set[str] = set()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.storage.close())
        self.loop.close()

    @initialize()
    def populate(self) -> None:
        self.run(self.storage.open())
        self.run(self.storage.add_pool(Pool("p", max_concurrency=POOL_LIMIT, sticky_ttl=20.0)))
        members = [
            upstream(i, max_concurrency=1 if i == 0 else None, country="AR" if i % 2 else "US")
            for i in range(SIZE)
        ]
        self.run(self.storage.add_upstreams(members))
        self.ids = [m.id for m in members]

    @rule(
        target=leases,
        selector=st.sampled_from(list(Selector)),
        country=st.sampled_from([None, "AR", "US"]),
        session=st.sampled_from([None, None, "s1", "s2"]),
        duration=st.sampled_from([None, 5.0, 30.0]),
    )
    def acquire(
        self, selector: Selector, country: str | None, session: str | None, duration: float | None
    ) -> Lease | None:
        request = LeaseRequest(
            "p",
            selector=selector,
            filters=None if country is None else Filter(country=country),
            session=session,
            duration=duration,
        )
        try:
            lease = self.run(self.storage.acquire(request, holder="h", now=self.now))
        except NoUpstreamAvailable:  # every match ejected: the only error allowed here
            return None
        if lease is not None:
            self.granted.add(lease.id)
            if lease.rebound_from is not None:
                held = self.run(self.storage.list_leases("p"))
                self.parted.update(
                    old.id for old in held if old.session == session and old.id != lease.id
                )
        return lease

    @rule(lease=consumes(leases))
    def release(self, lease: Lease | None) -> None:
        if lease is not None:
            self.run(self.storage.release(lease))

    @rule(lease=leases)
    def release_again(self, lease: Lease | None) -> None:
        if lease is not None:
            self.run(self.storage.release(lease))

    @rule(lease=leases, extra=st.sampled_from([None, 1.0, 50.0]))
    def renew(self, lease: Lease | None, extra: float | None) -> None:
        if lease is not None:
            self.run(self.storage.renew(lease, None if extra is None else self.now + extra))

    @rule(seconds=st.sampled_from([1.0, 6.0, 25.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.run(self.storage.release_expired(self.now))

    @rule(index=st.integers(0, SIZE - 1), eject=st.booleans())
    def health_changes(self, index: int, eject: bool) -> None:
        if eject:
            self.run(self.storage.eject(self.ids[index], until=self.now + 30, now=self.now))
        else:
            self.run(self.storage.readmit(self.ids[index], now=self.now))

    @invariant()
    def books_balance(self) -> None:
        if not hasattr(self, "ids"):
            return
        held = self.run(self.storage.list_leases("p"))
        per_upstream = collections.Counter(lease.upstream.id for lease in held)
        upstreams = {u.id: u for u in self.run(self.storage.list_upstreams("p"))}
        limits = {uid: u.max_concurrency or POOL_LIMIT for uid, u in upstreams.items()}
        for uid, count in per_upstream.items():
            assert count <= limits[uid], (uid, count)
        stats = self.run(self.storage.stats("p", self.now))
        ejected = {uid for uid, u in upstreams.items() if u.status is HealthStatus.EJECTED}
        assert stats.leases_held == len(held)
        assert stats.leased == len(per_upstream)
        assert stats.ejected == len(ejected)
        assert stats.active == SIZE - len(ejected)
        assert stats.total_leases == len(self.granted)
        assert stats.available == sum(
            1 for uid in upstreams if uid not in ejected and per_upstream[uid] < limits[uid]
        )
        sessions = collections.Counter(
            lease.session for lease in held if lease.session and lease.id not in self.parted
        )
        assert all(count == 1 for count in sessions.values())


LeasingMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryLeasing = LeasingMachine.TestCase
