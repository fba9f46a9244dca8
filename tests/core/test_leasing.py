"""The lease manager over every storage adapter: waiting, timeouts, scope, callbacks, sweeping."""

from __future__ import annotations

import asyncio
import collections

import pytest

from core.clock import ManualClock
from core.errors import NoUpstreamAvailable, PoolNotFound
from core.filters import Filter
from core.leasing import LeaseEvent, LeaseEventKind, LeaseManager
from core.models import Lease, LeaseRequest, Outcome, Pool
from core.storage.interface import Storage
from tests.core.conftest import make_pool, upstream


async def until_waiting(manager: LeaseManager, pool: str, count: int) -> None:
    """Yield to the loop until `count` acquirers are queued. Turns are enough for a storage
    without I/O; a database round trip on a loaded machine may need real time (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while loop.time() < deadline:
        if manager.waiting(pool) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{manager.waiting(pool)} waiters, expected {count}")


async def test_200_concurrent_acquirers_never_exceed_max_concurrency(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 4, max_concurrency=2)
    in_use: collections.Counter[str] = collections.Counter()
    peak = 0
    served = 0

    async def worker() -> None:
        nonlocal peak, served
        async with manager.lease(LeaseRequest("p"), timeout=30.0) as lease:
            in_use[lease.upstream.id] += 1
            peak = max(peak, max(in_use.values()))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            in_use[lease.upstream.id] -= 1
            served += 1

    await asyncio.gather(*(worker() for _ in range(200)))
    assert served == 200
    # Never above the limit; whether it is reached depends on how the storage interleaves.
    assert 1 <= peak <= 2
    assert (await storage.stats("p", 0)).leases_held == 0


async def test_waiters_are_served_first_come_first_served(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    holding = await manager.acquire(LeaseRequest("p"), timeout=1.0)
    order: list[int] = []

    async def waiter(number: int) -> None:
        lease = await manager.acquire(LeaseRequest("p"), timeout=30.0)
        order.append(number)
        await manager.release(lease)

    tasks = []
    for number in range(5):
        tasks.append(asyncio.create_task(waiter(number)))
        await until_waiting(manager, "p", number + 1)
    await manager.release(holding)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_newcomer_does_not_overtake_the_line(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    holding = await manager.acquire(LeaseRequest("p"), timeout=1.0)
    first = asyncio.create_task(manager.acquire(LeaseRequest("p"), timeout=30.0))
    await until_waiting(manager, "p", 1)
    await manager.release(holding)
    # The capacity was handed to the waiter during release: a newcomer finds none.
    with pytest.raises(NoUpstreamAvailable):
        await manager.acquire(LeaseRequest("p"), timeout=0.0)
    await manager.release(await first)


async def test_a_waiter_whose_filter_does_not_fit_lets_the_next_one_through(
    manager: LeaseManager, storage: Storage
) -> None:
    await storage.add_pool(Pool("p", max_concurrency=1))
    await storage.add_upstreams([upstream(0, country="AR"), upstream(1, country="US")])
    ar = await manager.acquire(LeaseRequest("p", filters=Filter(country="AR")), timeout=1.0)
    us = await manager.acquire(LeaseRequest("p", filters=Filter(country="US")), timeout=1.0)
    wants_ar = asyncio.create_task(
        manager.acquire(LeaseRequest("p", filters=Filter(country="AR")), timeout=30.0)
    )
    await until_waiting(manager, "p", 1)
    wants_us = asyncio.create_task(
        manager.acquire(LeaseRequest("p", filters=Filter(country="US")), timeout=30.0)
    )
    await until_waiting(manager, "p", 2)
    await manager.release(us)
    assert (await wants_us).upstream.id == us.upstream.id
    assert not wants_ar.done()
    await manager.release(ar)
    assert (await wants_ar).upstream.id == ar.upstream.id


async def test_waiting_times_out_with_a_typed_error(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    await manager.acquire(LeaseRequest("p"), timeout=1.0)
    with pytest.raises(NoUpstreamAvailable) as caught:
        await manager.acquire(LeaseRequest("p"), timeout=0.05)
    assert caught.value.waited >= 0.04
    assert "busy" in caught.value.reason
    assert manager.waiting("p") == 0


async def test_nothing_to_wait_for_fails_at_once(manager: LeaseManager, storage: Storage) -> None:
    await storage.add_pool(Pool("empty"))
    with pytest.raises(NoUpstreamAvailable) as caught:
        await manager.acquire(LeaseRequest("empty"), timeout=30.0)
    assert caught.value.waited == 0.0
    with pytest.raises(PoolNotFound):
        await manager.acquire(LeaseRequest("nowhere"), timeout=30.0)


async def test_a_cancelled_waiter_leaves_the_line_and_leaks_nothing(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    holding = await manager.acquire(LeaseRequest("p"), timeout=1.0)
    doomed = asyncio.create_task(manager.acquire(LeaseRequest("p"), timeout=30.0))
    await until_waiting(manager, "p", 1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert manager.waiting("p") == 0
    await manager.release(holding)
    assert (await storage.stats("p", 0)).leases_held == 0


async def test_a_waiter_cancelled_after_the_handover_gives_the_lease_back(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    holding = await manager.acquire(LeaseRequest("p"), timeout=1.0)
    doomed = asyncio.create_task(manager.acquire(LeaseRequest("p"), timeout=30.0))
    await until_waiting(manager, "p", 1)
    await manager.release(holding)  # hands the lease to the waiter...
    doomed.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert (await storage.stats("p", 0)).leases_held == 0


async def test_the_lease_block_releases_on_error_and_cancellation(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 2)
    with pytest.raises(RuntimeError):
        async with manager.lease(LeaseRequest("p"), timeout=1.0):
            raise RuntimeError("boom")
    entered = asyncio.Event()

    async def hold_forever() -> None:
        async with manager.lease(LeaseRequest("p"), timeout=1.0):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold_forever())
    await entered.wait()
    assert (await storage.stats("p", 0)).leases_held == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await storage.stats("p", 0)).leases_held == 0


async def test_a_session_lease_outlives_the_block_and_restarts_its_idle_clock(
    manager: LeaseManager, storage: Storage, clock: ManualClock
) -> None:
    await make_pool(storage, 4, sticky_ttl=60.0)
    request = LeaseRequest("p", session="abc")
    async with manager.lease(request, timeout=1.0) as first:
        clock.advance(50.0)
    assert first.expires_at == clock.now() + 60.0
    clock.advance(50.0)
    async with manager.lease(request, timeout=1.0) as second:
        assert second.id == first.id
    clock.advance(61.0)
    assert [lease.id for lease in await manager.sweep()] == [first.id]
    async with manager.lease(request, timeout=1.0) as third:
        assert third.id != first.id


async def test_double_release_is_counted_and_changes_nothing(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 1)
    lease = await manager.acquire(LeaseRequest("p"), timeout=1.0)
    assert await manager.release(lease) is True
    assert await manager.release(lease) is False
    assert manager.double_releases == 1
    assert (await storage.stats("p", 0)).leases_held == 0


async def test_renew_and_sweep_with_a_stepped_clock(
    manager: LeaseManager, storage: Storage, clock: ManualClock
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    lease = await manager.acquire(LeaseRequest("p", duration=10.0), timeout=1.0)
    clock.advance(8.0)
    assert await manager.renew(lease, 10.0)
    clock.advance(8.0)
    assert await manager.sweep() == []
    clock.advance(2.0)
    assert [e.id for e in await manager.sweep()] == [lease.id]
    assert await manager.renew(lease, 10.0) is False


async def test_expiry_hands_capacity_to_a_waiter(
    manager: LeaseManager, storage: Storage, clock: ManualClock
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    await manager.acquire(LeaseRequest("p", duration=5.0), timeout=1.0)
    waiter = asyncio.create_task(manager.acquire(LeaseRequest("p"), timeout=30.0))
    await until_waiting(manager, "p", 1)
    clock.advance(5.0)
    await manager.sweep()
    await manager.release(await waiter)


async def test_the_background_sweeper_runs_on_its_own(storage: Storage) -> None:
    clock = ManualClock()
    await make_pool(storage, 1)
    async with LeaseManager(storage, clock=clock, sweep_interval=0.01) as manager:
        await manager.acquire(LeaseRequest("p", duration=1.0), timeout=1.0)
        clock.advance(2.0)
        for _ in range(500):
            if (await storage.stats("p", 0)).leases_held == 0:
                break
            await asyncio.sleep(0.01)
        assert (await storage.stats("p", 0)).leases_held == 0


async def test_notify_wakes_waiters_when_upstreams_are_added(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    await manager.acquire(LeaseRequest("p"), timeout=1.0)
    waiter = asyncio.create_task(manager.acquire(LeaseRequest("p"), timeout=30.0))
    await until_waiting(manager, "p", 1)
    await storage.add_upstreams([upstream(99)])
    manager.notify("p")
    assert (await waiter).upstream.id == upstream(99).id


async def test_callbacks_see_timing_and_a_stats_snapshot(
    manager: LeaseManager, storage: Storage, clock: ManualClock
) -> None:
    await make_pool(storage, 2)
    events: list[LeaseEvent] = []
    manager.on_acquire(events.append)
    manager.on_release(events.append)
    manager.on_acquire(lambda _: (_ for _ in ()).throw(ValueError("a broken callback")))
    lease = await manager.acquire(LeaseRequest("p"), timeout=1.0)
    clock.advance(3.0)
    await manager.release(lease)
    acquired, released = events
    assert (acquired.kind, acquired.lease, acquired.waited) == (LeaseEventKind.ACQUIRED, lease, 0.0)
    assert acquired.stats.leases_held == 1
    assert (released.kind, released.held) == (LeaseEventKind.RELEASED, 3.0)
    assert released.stats.leases_held == 0


async def test_callbacks_report_expiry(
    manager: LeaseManager, storage: Storage, clock: ManualClock
) -> None:
    await make_pool(storage, 1)
    events: list[LeaseEvent] = []
    manager.on_release(events.append)
    lease: Lease = await manager.acquire(LeaseRequest("p", duration=1.0), timeout=1.0)
    clock.advance(1.0)
    await manager.sweep()
    assert [(e.kind, e.lease.id) for e in events] == [(LeaseEventKind.EXPIRED, lease.id)]


async def test_a_bound_session_never_queues_nor_yields_its_lease_to_waiters(
    manager: LeaseManager, storage: Storage
) -> None:
    await make_pool(storage, 2, max_concurrency=1)
    session = await manager.acquire(LeaseRequest("p", session="s"), timeout=1.0)
    other = await manager.acquire(LeaseRequest("p"), timeout=1.0)
    waiter = asyncio.create_task(manager.acquire(LeaseRequest("p"), timeout=30.0))
    await until_waiting(manager, "p", 1)
    again = await manager.acquire(LeaseRequest("p", session="s"), timeout=0.0)
    assert again.id == session.id
    assert manager.users_of(session) == 2
    assert not waiter.done()  # the session's upstream was not handed away
    await manager.put_back(again)
    await manager.put_back(session)
    await manager.release(other)
    await manager.release(await waiter)


async def test_a_session_in_use_does_not_expire_until_its_last_user_is_done(
    manager: LeaseManager, storage: Storage, clock: ManualClock
) -> None:
    await make_pool(storage, 2, sticky_ttl=10.0)
    first = await manager.acquire(LeaseRequest("p", session="s"), timeout=1.0)
    second = await manager.acquire(LeaseRequest("p", session="s"), timeout=1.0)
    clock.advance(100.0)
    assert await manager.sweep() == []  # a long tunnel keeps its session
    await manager.put_back(first)
    clock.advance(100.0)
    assert await manager.sweep() == []  # still one user
    await manager.put_back(second)
    clock.advance(9.0)
    assert await manager.sweep() == []
    clock.advance(1.0)
    assert [lease.id for lease in await manager.sweep()] == [first.id]


async def test_outcomes_reported_without_waiting_are_recorded_by_close(
    storage: Storage, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    members = await make_pool(storage, 2)
    manager = LeaseManager(storage, clock=clock, sweep_interval=3600)
    async with manager:
        for _ in range(3):
            await manager.report_soon(members[0].id, Outcome.CONNECT_REFUSED, None)
        await manager.report_soon(members[1].id, Outcome.OK, 0.25)
        # An upstream removed meanwhile: nothing to record, nothing to complain about.
        await manager.report_soon("up-missing", Outcome.OK, 0.25)
    # Leaving the block closed the manager, which waited for every report to be written.
    assert (await storage.get_upstream(members[0].id)).failure_streak == 3
    assert (await storage.get_upstream(members[1].id)).latency_ewma == 0.25
    assert "not recorded" not in caplog.text


async def test_successes_reported_without_waiting_are_written_before_a_later_failure(
    storage: Storage, clock: ManualClock
) -> None:
    """On a database, successes wait a moment to go together; a failure reported after them
    must still land after them (a success clears the failure streak)."""
    (member,) = await make_pool(storage, 1)
    manager = LeaseManager(storage, clock=clock, sweep_interval=3600)
    start = clock.now()
    async with manager:
        for latency in (0.1, 0.2, 0.3):
            await manager.report_soon(member.id, Outcome.OK, latency)
            clock.advance(1.0)
        await manager.report(member.id, Outcome.CONNECT_REFUSED, None)
        history = await storage.history(member.id)
        assert [(r.outcome, r.at - start) for r in history] == [
            (Outcome.OK, 0.0),
            (Outcome.OK, 1.0),
            (Outcome.OK, 2.0),
            (Outcome.CONNECT_REFUSED, 3.0),
        ]
        assert (await storage.get_upstream(member.id)).failure_streak == 1


async def test_successes_reported_without_waiting_are_written_soon(
    storage: Storage, clock: ManualClock
) -> None:
    (member,) = await make_pool(storage, 1)
    manager = LeaseManager(storage, clock=clock, sweep_interval=3600)
    async with manager:
        await manager.report_soon(member.id, Outcome.OK, 0.5)
        for _ in range(500):
            if (await storage.get_upstream(member.id)).latency_ewma == 0.5:
                break
            await asyncio.sleep(0.01)
        assert (await storage.get_upstream(member.id)).latency_ewma == 0.5


async def test_leases_started_and_given_back_without_awaiting_are_all_accounted_for(
    storage: Storage, clock: ManualClock
) -> None:
    """Where the storage can (PostgreSQL's batched statements), a plain lease is started
    without awaiting and given back without awaiting; memory leases at once; elsewhere nothing
    is started and `acquire` does it all."""
    await make_pool(storage, 2)
    manager = LeaseManager(storage, clock=clock, sweep_interval=3600)
    plain, sticky = LeaseRequest("p"), LeaseRequest("p", session="s1")
    async with manager:
        await manager.put_back(await manager.acquire(plain, timeout=1))  # the pool known
        # A session's lease is renewed once taken: at once (memory), else awaited.
        session = manager.take_now(sticky)
        assert not isinstance(session, asyncio.Future)
        if session is not None:
            manager.give_back(session)
        taken = [manager.take_now(plain) for _ in range(4)]
        if not any(isinstance(answer, asyncio.Future) for answer in taken):
            for answer in taken:  # leased at once (memory) or awaited (SQLite)
                if isinstance(answer, Lease):
                    manager.give_back(answer)
            return
        pending = [answer for answer in taken if isinstance(answer, asyncio.Future)]
        assert len(pending) == 4
        await asyncio.wait(pending)
        leases = [manager.taken(plain, future) for future in pending]
        granted = [lease for lease in leases if lease is not None]
        assert len(granted) == 4
        assert len(await storage.list_leases("p")) == 4
        for lease in granted:
            manager.give_back(lease)
        manager.give_back(granted[0])  # a second time: counted once answered
    # Closing waited for the releases sent without waiting.
    assert await storage.list_leases("p") == []
    assert manager.double_releases == 1
