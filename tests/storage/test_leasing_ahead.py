"""PostgreSQL's leases held ahead (`core.storage.sql.ahead`): while requests of one kind keep
coming faster than a statement answers, the statements also lease for the requests to come,
which then take those leases at once, in the order the database granted them. Every lease
held ahead is a lease in the database; none is held on a limited upstream, and none outlives
a quiet moment, an ejection, the pool's removal or the storage's close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from core.errors import StorageUnavailable
from core.models import Lease, LeaseRequest, Pool
from core.storage.sql import SQLStorage, ahead
from core.storage.sql import fast as fast_paths
from tests.core.conftest import make_pool
from tests.storage.scratch import POSTGRES_URL, ScratchPostgres, open_scratch_postgres
from tests.storage.test_batched_leasing import NOW, warm
from tests.support.waiting import eventually


@pytest.fixture
async def storage(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ScratchPostgres]:
    # Long enough that a busy machine does not see them go stale mid-test.
    monkeypatch.setattr(ahead, "TTL", 2.0)
    async with open_scratch_postgres() as scratch:
        yield scratch


async def held_in_database(storage: SQLStorage) -> int:
    connection = await asyncpg.connect(
        POSTGRES_URL, server_settings={"search_path": storage.schema or ""}
    )
    try:
        count = await connection.fetchval("SELECT count(*) FROM leases")
    finally:
        await connection.close()
    assert isinstance(count, int)
    return count


async def stock_up(storage: SQLStorage) -> list[Lease]:
    """Eight requests answered by one statement, then one more: that one's statement also
    leases for the requests to come (three round trips' worth). The nine leases in use."""
    burst = await asyncio.gather(
        *(storage.acquire(LeaseRequest("p"), holder="h1", now=NOW) for _ in range(8))
    )
    assert all(lease is not None for lease in burst)
    one = await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW)
    assert one is not None
    return [lease for lease in [*burst, one] if lease is not None]


def taken_at_once(storage: SQLStorage) -> Lease | None:
    """A request that needs no statement: the lease it took, or None when it must wait."""
    request = LeaseRequest("p")
    pending = storage.acquire_nowait(request, holder="h1", now=NOW)
    assert pending is not None
    if not pending.done():
        pending.cancel()
        return None
    return storage.acquired(request, pending)


async def give_back(storage: SQLStorage, leases: list[Lease]) -> None:
    for lease in leases:
        assert await storage.release(lease)


async def test_requests_that_keep_coming_take_leases_held_ahead_in_rotation(
    storage: ScratchPostgres,
) -> None:
    await make_pool(storage, 4)
    await warm(storage)
    in_use = await stock_up(storage)
    assert await held_in_database(storage) > len(in_use)  # held ahead: leases in the database
    taken = [taken_at_once(storage) for _ in range(8)]
    assert all(lease is not None for lease in taken)
    rotation = [lease.upstream.id for lease in [in_use[-1], *taken] if lease is not None]
    assert all(len(set(rotation[i : i + 4])) == 4 for i in range(len(rotation) - 3))
    assert len({lease.id for lease in [*in_use, *taken] if lease is not None}) == 17


async def test_leases_held_ahead_go_back_when_the_requests_stop(storage: ScratchPostgres) -> None:
    await make_pool(storage, 4)
    await warm(storage)
    in_use = await stock_up(storage)
    await give_back(storage, in_use)

    async def none_held() -> bool:
        return await held_in_database(storage) == 0

    await eventually(none_held, "every lease held ahead given back")


async def test_limited_upstreams_are_never_held_ahead(storage: ScratchPostgres) -> None:
    await make_pool(storage, 4, max_concurrency=100)
    await warm(storage)
    in_use = await stock_up(storage)

    async def only_those_in_use() -> bool:
        return await held_in_database(storage) == len(in_use)

    # What came ahead went straight back.
    await eventually(only_those_in_use, "only the leases in use held")
    assert taken_at_once(storage) is None
    lease = await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW)
    assert lease is not None
    assert await held_in_database(storage) == len(in_use) + 1  # and no more was asked for


async def test_a_pool_whose_limit_went_holds_leases_ahead_again(storage: ScratchPostgres) -> None:
    await make_pool(storage, 4, max_concurrency=100)
    await warm(storage)
    await give_back(storage, await stock_up(storage))
    await storage.update_pool(Pool("p"))
    await warm(storage)
    in_use = await stock_up(storage)
    assert await held_in_database(storage) > len(in_use)


async def test_an_ejected_upstream_loses_its_leases_held_ahead_at_once(
    storage: ScratchPostgres,
) -> None:
    members = await make_pool(storage, 4)
    await warm(storage)
    await stock_up(storage)
    ejected = members[0].id
    await storage.eject(ejected, until=NOW + 60, now=NOW)
    taken = [taken_at_once(storage) for _ in range(6)]
    assert all(lease is not None for lease in taken)
    assert ejected not in {lease.upstream.id for lease in taken if lease is not None}


async def test_a_pool_holding_leases_ahead_can_be_removed(storage: ScratchPostgres) -> None:
    await make_pool(storage, 4)
    await warm(storage)
    await give_back(storage, await stock_up(storage))
    await storage.remove_pool("p")
    assert await held_in_database(storage) == 0


async def test_closing_gives_back_every_lease_held_ahead(storage: ScratchPostgres) -> None:
    await make_pool(storage, 4)
    worker = SQLStorage(storage.url, schema=storage.schema)
    await worker.open()
    try:
        first = await worker.acquire(LeaseRequest("p"), holder="h1", now=NOW)
        assert first is not None
        await give_back(worker, [first, *await stock_up(worker)])
        assert await held_in_database(storage) > 0
    finally:
        await worker.close()
    assert await held_in_database(storage) == 0


@pytest.mark.parametrize(
    "failure",
    [StorageUnavailable("storage database unavailable: test"), asyncio.CancelledError()],
    ids=["unavailable", "cut-off"],
)
async def test_leases_held_ahead_that_could_not_go_back_are_tried_again(
    storage: ScratchPostgres, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    await make_pool(storage, 4)
    await warm(storage)
    in_use = await stock_up(storage)
    await give_back(storage, in_use)
    fast = storage._fast
    assert fast is not None
    fetch = fast._fetch

    async def releases_fail(statement: fast_paths.Compiled, params: dict[str, Any]) -> Any:
        if "p_pool" not in params:
            raise failure
        return await fetch(statement, params)

    monkeypatch.setattr(fast_paths, "GIVE_BACK_RETRY", 0.2)
    monkeypatch.setattr(fast, "_fetch", releases_fail)
    await storage.update_pool(Pool("p"))  # gives back the pool's leases held ahead: it fails
    await asyncio.sleep(0.1)
    assert await held_in_database(storage) > 0
    monkeypatch.setattr(fast, "_fetch", fetch)

    async def none_held() -> bool:
        return await held_in_database(storage) == 0

    await eventually(none_held, "every lease held ahead given back")
