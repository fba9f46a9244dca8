"""Leases granted to this process whose answer an outage cut off: the storage holds them for a
live holder, nothing here knows of them, and once the storage answers again the lease manager
gives them back (seen unknown twice, so an answer still on its way is never mistaken). The
looks go on while anything granted before the outage is held."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from core.clock import ManualClock
from core.errors import StorageUnavailable
from core.leasing import LeaseManager, unanswered
from core.leasing.unanswered import UnansweredGrants
from core.models import Lease, LeaseRequest
from core.storage.interface import Storage
from core.storage.memory import MemoryStorage
from tests.core.conftest import make_pool
from tests.storage.flaky import FlakyStorage, flaky

HOLDER = "gw-test"


@pytest.fixture
def memory() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def manager(
    memory: MemoryStorage, clock: ManualClock
) -> AsyncIterator[tuple[LeaseManager, FlakyStorage]]:
    storage, switch = flaky(memory)
    async with LeaseManager(
        storage, clock=clock, instance_id=HOLDER, sweep_interval=3600
    ) as leases:
        yield leases, switch


async def lost_grant(
    memory: MemoryStorage, clock: ManualClock, session: str | None = None
) -> Lease:
    """A lease the storage granted to this process, whose answer never reached it."""
    request = LeaseRequest("p", session=session)
    lease = await memory.acquire(request, holder=HOLDER, now=clock.now())
    assert lease is not None
    return lease


class ListingsCounted:
    """The storage, counting `list_leases` calls."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.listings = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list_leases(self, pool: str | None = None) -> list[Lease]:
        self.listings += 1
        return await self.inner.list_leases(pool)


async def held(memory: MemoryStorage) -> set[str]:
    return {lease.id for lease in await memory.list_leases()}


async def test_a_grant_whose_answer_was_lost_is_given_back_after_the_outage(
    manager: tuple[LeaseManager, FlakyStorage],
    memory: MemoryStorage,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(unanswered, "CONFIRM_AFTER", 0.0)
    leases, switch = manager
    await make_pool(memory, 4, max_concurrency=1, sticky_ttl=60.0)
    in_use = await leases.acquire(LeaseRequest("p"), timeout=1.0)
    session = await lost_grant(memory, clock, session="s1")  # expires by its own TTL
    lost = await lost_grant(memory, clock)

    switch.down = True
    assert await leases.put_back(in_use) is True  # kept: the manager knows the storage is away
    switch.down = False
    clock.advance(1.0)
    await leases.sweep()  # the outage ends (the release kept is written): the first look
    assert lost.id in await held(memory)
    await leases.sweep()  # unknown again: given back

    assert await held(memory) == {session.id}
    # Its upstream carries requests again: three of the four free, the session holds one.
    taken = [await leases.acquire(LeaseRequest("p"), timeout=1.0) for _ in range(3)]
    for lease in taken:
        await leases.put_back(lease)


async def test_without_an_outage_nothing_is_looked_for(
    manager: tuple[LeaseManager, FlakyStorage],
    memory: MemoryStorage,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(unanswered, "CONFIRM_AFTER", 0.0)
    leases, _ = manager
    await make_pool(memory, 2)
    stranger = await lost_grant(memory, clock)  # e.g. held ahead by a storage that does so
    await leases.sweep()
    await leases.sweep()
    assert stranger.id in await held(memory)


async def test_an_answer_that_arrives_between_the_two_looks_keeps_its_lease(
    memory: MemoryStorage, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unanswered, "CONFIRM_AFTER", 0.0)
    await make_pool(memory, 3)
    known: set[str] = set()
    grants = UnansweredGrants(memory, HOLDER, lambda: known)
    late = await lost_grant(memory, clock)
    lost = await lost_grant(memory, clock)
    grants.outage_noticed(clock.now())
    clock.advance(1.0)
    after = await lost_grant(memory, clock)  # granted after the outage: not a suspect

    assert await grants.sweep(0.0) == 0
    known.add(late.id)  # its answer came in meanwhile
    assert await grants.sweep(1.0) == 1
    assert await held(memory) == {late.id, after.id}
    assert lost.id not in await held(memory)


async def test_the_second_look_waits_its_time(memory: MemoryStorage, clock: ManualClock) -> None:
    await make_pool(memory, 2)
    grants = UnansweredGrants(memory, HOLDER, set)
    lost = await lost_grant(memory, clock)
    grants.outage_noticed(clock.now())
    assert await grants.sweep(100.0) == 0
    assert await grants.sweep(100.0 + unanswered.CONFIRM_AFTER / 2) == 0
    assert lost.id in await held(memory)
    assert await grants.sweep(100.0 + unanswered.CONFIRM_AFTER) == 1
    assert lost.id not in await held(memory)


async def test_an_outage_only_an_acquire_met_is_looked_into(
    manager: tuple[LeaseManager, FlakyStorage],
    memory: MemoryStorage,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database went away and came back between two sweeps, and only a request's acquire
    met it (its grant committed, its answer lost): the storage's count of lost contacts
    moved, and that is enough."""
    monkeypatch.setattr(unanswered, "CONFIRM_AFTER", 0.0)
    leases, switch = manager
    await make_pool(memory, 2)
    lost = await lost_grant(memory, clock)
    switch.down = True
    with pytest.raises(StorageUnavailable):
        await leases.acquire(LeaseRequest("p"), timeout=1.0)
    switch.down = False
    clock.advance(1.0)
    await leases.sweep()
    await leases.sweep()
    assert lost.id not in await held(memory)


async def test_a_lease_known_at_one_look_and_lost_later_is_still_found(
    memory: MemoryStorage, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unanswered, "CONFIRM_AFTER", 0.0)
    await make_pool(memory, 2)
    known: set[str] = set()
    grants = UnansweredGrants(memory, HOLDER, lambda: known)
    lease = await lost_grant(memory, clock)
    known.add(lease.id)  # being given back when the outage ended
    grants.outage_noticed(clock.now())
    assert await grants.sweep(0.0) == 0
    assert await grants.sweep(1.0) == 0
    known.clear()  # and then lost to this process without a word
    assert await grants.sweep(2.0) == 0
    assert await grants.sweep(3.0) == 1
    assert await held(memory) == set()


async def test_the_looks_end_once_nothing_granted_before_the_outage_is_held(
    memory: MemoryStorage, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unanswered, "CONFIRM_AFTER", 0.0)
    await make_pool(memory, 2)
    listed = ListingsCounted(memory)
    in_use = await lost_grant(memory, clock)
    grants = UnansweredGrants(cast(Storage, listed), HOLDER, lambda: {in_use.id})
    grants.outage_noticed(clock.now())
    assert await grants.sweep(0.0) == 0
    assert await memory.release(in_use)  # given back as usual
    assert await grants.sweep(1.0) == 0
    assert listed.listings == 2
    assert await grants.sweep(2.0) == 0
    assert listed.listings == 2  # nothing left to look for
