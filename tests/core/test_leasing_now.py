"""Leasing without awaiting (memory storage): done only where nothing else has to happen, and
then exactly what the awaited calls do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from core.clock import ManualClock
from core.leasing import LeaseEvent, LeaseManager
from core.models import Lease, LeaseRequest
from core.storage.memory import MemoryStorage
from tests.core.conftest import make_pool
from tests.core.test_leasing import until_waiting
from tests.storage.flaky import flaky


@pytest.fixture
async def memory() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
async def manager(memory: MemoryStorage) -> AsyncIterator[LeaseManager]:
    leases = LeaseManager(memory, clock=ManualClock(), instance_id="gw", sweep_interval=3600)
    async with leases:
        yield leases


def now(manager: LeaseManager, request: LeaseRequest) -> Lease | None:
    """`take_now` on memory storage: a lease at once, or None (never a future)."""
    taken = manager.take_now(request)
    assert taken is None or isinstance(taken, Lease)
    return taken


async def held(memory: MemoryStorage) -> int:
    return (await memory.stats("p", 0)).leases_held


async def test_leases_at_once_in_rotation_and_gives_back(
    manager: LeaseManager, memory: MemoryStorage
) -> None:
    await make_pool(memory, 3, max_concurrency=1)
    leases = [now(manager, LeaseRequest("p")) for _ in range(4)]
    assert leases[3] is None  # all three busy: acquire() waits in line for it
    granted = [lease for lease in leases if lease is not None]
    assert len({lease.upstream.id for lease in granted}) == 3
    assert await held(memory) == 3
    for lease in granted:
        manager.give_back(lease)
    assert await held(memory) == 0  # given back at once
    manager.give_back(granted[0])  # a second release changes nothing ...
    assert manager.double_releases == 1  # ... and is counted, as release() counts it


async def test_a_session_is_leased_and_put_back_at_once_as_the_awaited_calls_do(
    manager: LeaseManager, memory: MemoryStorage
) -> None:
    await make_pool(memory, 2)
    request = LeaseRequest("p", session="s1")
    first = now(manager, request)
    assert first is not None
    assert now(manager, request) is first  # the session's second user: its lease
    assert (first.uses, manager.users_of(first), first.expires_at) == (2, 2, None)
    manager.give_back(first)
    assert first.expires_at is None  # a user is left: no idle countdown yet
    manager.give_back(first)
    assert first.idle_ttl is not None
    assert first.expires_at == manager.clock.now() + first.idle_ttl
    assert (await memory.stats("p", 0)).leases_held == 1  # still bound to its session
    # The awaited calls take up the same session where these left it.
    lease = await manager.acquire(request, timeout=1.0)
    assert (lease, lease.uses, lease.expires_at) == (first, 3, None)
    assert await manager.put_back(lease)
    assert lease.expires_at == manager.clock.now() + first.idle_ttl


async def test_a_session_parted_from_its_upstream_is_released_by_its_last_user(
    manager: LeaseManager, memory: MemoryStorage
) -> None:
    await make_pool(memory, 2)
    request = LeaseRequest("p", session="s1")
    lease = now(manager, request)
    assert lease is not None
    await manager.unbind_session(lease, fail=False)
    manager.give_back(lease)
    assert await held(memory) == 0
    moved = now(manager, request)  # bound anew, and says where it came from
    assert moved is not None
    assert moved.rebound_from == lease.upstream.id
    manager.give_back(moved)
    assert await held(memory) == 1  # bound to its session until its idle TTL


async def test_nothing_is_done_at_once_while_others_wait_in_line(
    manager: LeaseManager, memory: MemoryStorage
) -> None:
    await make_pool(memory, 1, max_concurrency=1)
    first = now(manager, LeaseRequest("p"))
    assert first is not None
    waiter = asyncio.create_task(manager.acquire(LeaseRequest("p"), timeout=5.0))
    await until_waiting(manager, "p", 1)
    # Freed capacity goes to the waiter first: that is the awaited path's job.
    assert now(manager, LeaseRequest("p")) is None
    manager.give_back(first)
    assert await held(memory) == 1  # not at once
    second = await asyncio.wait_for(waiter, 5.0)
    await manager.put_back(second)


async def test_callbacks_are_told_so_nothing_is_done_at_once(
    manager: LeaseManager, memory: MemoryStorage
) -> None:
    await make_pool(memory, 1)
    events: list[LeaseEvent] = []
    manager.on_acquire(events.append)
    manager.on_release(events.append)
    assert now(manager, LeaseRequest("p")) is None
    lease = await manager.acquire(LeaseRequest("p"), timeout=1.0)
    manager.give_back(lease)
    assert await held(memory) == 1  # not at once
    await manager.close()  # waits for what it gave back in tasks
    assert [event.kind.value for event in events] == ["acquired", "released"]


async def test_a_wrapped_storage_is_never_used_at_once(memory: MemoryStorage) -> None:
    """A wrapper forwarding attribute lookups (here: one that fails calls on purpose) keeps
    every call going through its own awaited methods."""
    await make_pool(memory, 1)
    wrapped, switch = flaky(memory)
    async with LeaseManager(wrapped, instance_id="gw", sweep_interval=3600) as manager:
        assert now(manager, LeaseRequest("p")) is None
        lease = await manager.acquire(LeaseRequest("p"), timeout=1.0)
        switch.down = True
        assert await manager.put_back(lease)  # kept for when the storage answers again
        assert switch.refused == {"release": 1}
