"""The lease manager while its storage is unavailable: acquiring fails at once, giving back never
fails, and what could not be written (releases, sessions' idle countdowns, traffic outcomes) is
written by the first sweep that finds the storage answering again. After an outage longer than
the holder grace, leases another process took back are forgotten, not released twice."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from core.backlog import Backlog, OutcomeWrite
from core.clock import ManualClock
from core.errors import StorageUnavailable
from core.health import RecordSource, Transition
from core.leasing import LeaseManager
from core.models import LeaseRequest, Outcome, Pool, Upstream
from core.storage.memory import MemoryStorage
from core.storage.sql import SQLStorage
from tests.core.conftest import make_pool
from tests.core.test_leasing import until_waiting
from tests.storage.flaky import FlakyStorage, flaky
from tests.storage.scratch import ScratchSQLite


@pytest.fixture
def memory() -> MemoryStorage:
    return MemoryStorage()


@pytest.fixture
async def manager(memory: MemoryStorage) -> AsyncIterator[tuple[LeaseManager, FlakyStorage]]:
    storage, switch = flaky(memory)
    # Sweeps are driven by hand, after the test says whether the storage answers.
    async with LeaseManager(
        storage, clock=ManualClock(), instance_id="gw-test", sweep_interval=3600
    ) as leases:
        yield leases, switch


async def test_giving_back_while_down_is_kept_and_written_when_the_storage_answers(
    manager: tuple[LeaseManager, FlakyStorage], memory: MemoryStorage
) -> None:
    leases, switch = manager
    await make_pool(memory, 2, max_concurrency=1, sticky_ttl=60.0)
    plain = await leases.acquire(LeaseRequest("p"), timeout=1.0)
    session = await leases.acquire(LeaseRequest("p", session="s1"), timeout=1.0)
    assert session.expires_at is None  # in use: no idle countdown

    switch.down = True
    with pytest.raises(StorageUnavailable):
        await leases.acquire(LeaseRequest("p"), timeout=30.0)  # at once, not after 30 s
    assert await leases.put_back(plain) is True
    assert await leases.put_back(session) is True
    update = await leases.report(plain.upstream.id, Outcome.CONNECT_REFUSED, None)
    assert (update.upstream.id, update.transition) == (plain.upstream.id, Transition.NONE)
    with pytest.raises(StorageUnavailable):
        await leases.sweep()
    # Nothing reached the storage: both leases are still out, no outcome recorded.
    assert len(await memory.list_leases()) == 2
    assert await memory.history(plain.upstream.id) == []

    given_back_at = leases.clock.now()
    leases.clock.advance(5.0)  # type: ignore[attr-defined]
    switch.down = False
    assert await leases.sweep() == []
    held = await memory.list_leases()
    assert [lease.id for lease in held] == [session.id]
    # The idle countdown started when the session was given back, not when it was written.
    assert held[0].expires_at == given_back_at + 60.0
    [record] = await memory.history(plain.upstream.id)
    assert (record.at, record.outcome) == (given_back_at, Outcome.CONNECT_REFUSED)
    assert leases.double_releases == 0
    again = await leases.acquire(LeaseRequest("p"), timeout=1.0)
    assert again.upstream.id == plain.upstream.id  # its capacity is back
    await leases.release(again)


async def test_a_session_used_again_before_the_sweep_keeps_no_stale_countdown(
    manager: tuple[LeaseManager, FlakyStorage], memory: MemoryStorage
) -> None:
    leases, switch = manager
    await make_pool(memory, 1, sticky_ttl=60.0)
    first = await leases.acquire(LeaseRequest("p", session="s1"), timeout=1.0)
    switch.down = True
    await leases.put_back(first)  # its idle countdown is kept
    switch.down = False
    second = await leases.acquire(LeaseRequest("p", session="s1"), timeout=1.0)
    assert second.id == first.id
    await leases.sweep()  # the kept countdown was superseded by the new use: not written
    [held] = await memory.list_leases()
    assert held.expires_at is None
    await leases.put_back(second)
    [held] = await memory.list_leases()
    assert held.expires_at == leases.clock.now() + 60.0


async def test_a_release_while_down_hands_its_capacity_to_a_waiter_once_written(
    manager: tuple[LeaseManager, FlakyStorage], memory: MemoryStorage
) -> None:
    leases, switch = manager
    await make_pool(memory, 1, max_concurrency=1)
    holding = await leases.acquire(LeaseRequest("p"), timeout=1.0)
    switch.down = True
    await leases.release(holding)
    switch.down = False
    waiter = asyncio.create_task(leases.acquire(LeaseRequest("p"), timeout=30.0))
    await until_waiting(leases, "p", 1)
    await leases.sweep()
    handed = await asyncio.wait_for(waiter, 10.0)
    assert handed.upstream.id == holding.upstream.id
    await leases.release(handed)
    assert await memory.list_leases() == []


async def test_reports_that_need_an_answer_raise_while_down(
    manager: tuple[LeaseManager, FlakyStorage], memory: MemoryStorage
) -> None:
    leases, switch = manager
    [member] = await make_pool(memory, 1)
    switch.down = True
    # Never leased here: nothing to answer with.
    with pytest.raises(StorageUnavailable):
        await leases.report(member.id, Outcome.OK, 0.1)
    switch.down = False
    lease = await leases.acquire(LeaseRequest("p"), timeout=1.0)
    await leases.release(lease)
    switch.down = True
    # Active checks decide on re-admission by the answer: they hear the truth.
    with pytest.raises(StorageUnavailable):
        await leases.report(member.id, Outcome.OK, 0.1, source=RecordSource.CHECK)


def test_kept_outcomes_are_bounded_oldest_dropped_first() -> None:
    backlog = Backlog(max_outcomes=3)
    for n in range(5):
        backlog.keep_outcome(
            OutcomeWrite(f"up-{n}", Outcome.OK, None, float(n), RecordSource.TRAFFIC, None)
        )
    assert [kept.upstream_id for kept in backlog.outcomes] == ["up-2", "up-3", "up-4"]
    assert backlog.dropped_outcomes == 2


async def test_outcomes_for_an_upstream_removed_meanwhile_are_dropped_not_stuck(
    manager: tuple[LeaseManager, FlakyStorage], memory: MemoryStorage
) -> None:
    leases, switch = manager
    first, second = await make_pool(memory, 2)
    for _ in (first, second):
        lease = await leases.acquire(LeaseRequest("p"), timeout=1.0)
        await leases.release(lease)
    switch.down = True
    await leases.report(first.id, Outcome.CONNECT_REFUSED, None)
    await leases.report(second.id, Outcome.CONNECT_REFUSED, None)
    switch.down = False
    await memory.remove_upstream(first.id)
    await leases.sweep()
    assert [r.outcome for r in await memory.history(second.id)] == [Outcome.CONNECT_REFUSED]


async def test_leases_taken_back_during_a_long_partition_are_forgotten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """This process cannot reach the database for longer than the holder grace while another
    can: the other's sweep takes this one's leases back (it cannot tell silence from death).
    When the storage answers again, this process forgets those leases instead of releasing
    them twice, and says so."""
    grace = 1.0
    cut_off = ScratchSQLite(holder_grace=grace, heartbeat_interval=3600)  # beats by sweeps only
    await cut_off.open()
    other = SQLStorage(cut_off.url, holder_grace=grace)
    await other.open()
    storage, switch = flaky(cut_off)
    leases = LeaseManager(storage, instance_id="gw-cut-off", sweep_interval=3600)
    try:
        await cut_off.add_pool(Pool("p", max_concurrency=1))
        await cut_off.add_upstreams([Upstream.from_url("http://10.1.0.1:8080", "p")])
        in_use = await leases.acquire(LeaseRequest("p"), timeout=1.0)
        await leases.sweep()
        switch.down = True
        taken: list[str] = []
        deadline = time.monotonic() + 15.0
        while not taken and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            taken = [lease.id for lease in await other.release_expired(time.time())]
        assert taken == [in_use.id]
        mine = await other.acquire(LeaseRequest("p"), holder="gw-other", now=time.time())
        assert mine is not None

        switch.down = False
        with caplog.at_level(logging.WARNING, logger="proxygate.leasing"):
            await leases.sweep()
        assert leases.lost_leases == 1
        assert "1 leases in use here were taken back" in caplog.text
        assert await leases.put_back(in_use) is False  # nothing of ours left to release
        assert leases.double_releases == 0
        [held] = await cut_off.list_leases()
        assert held.id == mine.id  # the other process's lease is untouched
    finally:
        await leases.close()
        await other.close()
        await cut_off.close()
