"""PostgreSQL's batched hot paths: acquires made together go out as one statement that may put
several leases of the batch on one upstream, and free upstreams that are only locked for a
moment are waited for, never reported busy. The batch must give what single acquires would:
limits kept, each caller its own lease, the selector's order."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from core.errors import StorageUnavailable
from core.leasing import LeaseManager
from core.models import Lease, LeaseRequest, Selector
from core.storage.sql.fast import Compiled
from tests.core.conftest import make_pool
from tests.storage.scratch import POSTGRES_URL, ScratchPostgres, open_scratch_postgres

NOW = 1_000.0


@pytest.fixture
async def storage() -> AsyncIterator[ScratchPostgres]:
    async with open_scratch_postgres() as scratch:
        yield scratch


async def warm(storage: ScratchPostgres, pool: str = "p") -> None:
    """One lease taken and given back: the storage now knows the pool, so what follows takes
    the batched statements (a pool's first acquire takes the full transaction)."""
    lease = await storage.acquire(LeaseRequest(pool), holder="h1", now=NOW)
    assert lease is not None
    assert await storage.release(lease)


async def together(storage: ScratchPostgres, count: int, pool: str = "p") -> list[Lease | None]:
    """`count` acquires made in one event-loop turn (one batch), each with its own consumer."""
    return await asyncio.gather(
        *(
            storage.acquire(LeaseRequest(pool, consumer=f"c{i}"), holder="h1", now=NOW)
            for i in range(count)
        )
    )


def per_upstream(leases: list[Lease | None]) -> dict[str, int]:
    return dict(collections.Counter(lease.upstream.id for lease in leases if lease is not None))


async def counts_in_database(storage: ScratchPostgres) -> list[tuple[int, int]]:
    """(active, leases held) of every upstream, as the database has them."""
    connection = await asyncpg.connect(
        POSTGRES_URL, server_settings={"search_path": storage.schema or ""}
    )
    try:
        rows = await connection.fetch(
            "SELECT u.active, (SELECT count(*) FROM leases l WHERE l.upstream_key = u.key) AS held"
            " FROM upstreams u ORDER BY u.key"
        )
    finally:
        await connection.close()
    return [(row["active"], row["held"]) for row in rows]


async def test_a_batch_shares_unlimited_upstreams_out_in_rotation(
    storage: ScratchPostgres,
) -> None:
    await make_pool(storage, 4)
    await warm(storage)
    leases = await together(storage, 16)
    assert all(lease is not None for lease in leases)
    assert sorted(per_upstream(leases).values()) == [4, 4, 4, 4]
    # Each caller got a lease of its own, recorded as its own.
    assert len({lease.id for lease in leases if lease is not None}) == 16
    assert [lease.consumer for lease in leases if lease is not None] == [f"c{i}" for i in range(16)]
    assert await counts_in_database(storage) == [(4, 4)] * 4
    assert all(await asyncio.gather(*(storage.release(lease) for lease in leases if lease)))
    assert await counts_in_database(storage) == [(0, 0)] * 4


async def test_a_batch_never_goes_over_the_limits(storage: ScratchPostgres) -> None:
    await make_pool(storage, 3, max_concurrency=2)
    await warm(storage)
    leases = await together(storage, 10)
    granted = [lease for lease in leases if lease is not None]
    assert len(granted) == 6
    assert per_upstream(leases) == {lease.upstream.id: 2 for lease in granted}
    assert await counts_in_database(storage) == [(2, 2)] * 3
    stats = await storage.stats("p", NOW)
    assert (stats.leases_held, stats.available) == (6, 0)


async def test_a_batch_fills_in_first_available_order(storage: ScratchPostgres) -> None:
    members = await make_pool(storage, 3, selector=Selector.FIRST_AVAILABLE, max_concurrency=2)
    await warm(storage)
    leases = await together(storage, 3)
    assert [lease.upstream.id for lease in leases if lease is not None] == [
        members[0].id,
        members[0].id,
        members[1].id,
    ]


async def test_a_batch_evens_out_least_used(storage: ScratchPostgres) -> None:
    members = await make_pool(storage, 3, selector=Selector.LEAST_USED)
    first = [await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW) for _ in range(2)]
    assert per_upstream(first) == {members[0].id: 1, members[1].id: 1}
    leases = await together(storage, 4)
    # Two go to the idle one first, then one each to the others.
    assert per_upstream(leases) == {members[2].id: 2, members[0].id: 1, members[1].id: 1}


@pytest.mark.parametrize("path", ["full transaction", "batched statement"])
async def test_free_upstreams_locked_for_a_moment_are_waited_for(
    storage: ScratchPostgres, path: str
) -> None:
    await make_pool(storage, 2)
    if path == "batched statement":
        await warm(storage)
    # Another transaction holds every upstream row, as a release in flight does until its
    # commit: the acquire waits for it instead of answering "all busy".
    other = await asyncpg.connect(
        POSTGRES_URL, server_settings={"search_path": storage.schema or ""}
    )
    try:
        locking = other.transaction()
        await locking.start()
        await other.execute("SELECT key FROM upstreams FOR UPDATE")
        pending = asyncio.ensure_future(storage.acquire(LeaseRequest("p"), holder="h1", now=NOW))
        await asyncio.sleep(0.2)
        assert not pending.done()
        await locking.commit()
        lease = await asyncio.wait_for(pending, 10)
    finally:
        await other.close()
    assert lease is not None
    assert await storage.release(lease)
    assert await counts_in_database(storage) == [(0, 0)] * 2


async def test_busy_is_still_busy_when_nothing_is_free(storage: ScratchPostgres) -> None:
    await make_pool(storage, 2, max_concurrency=1)
    await warm(storage)
    leases = await together(storage, 2)
    assert all(lease is not None for lease in leases)
    assert await together(storage, 3) == [None, None, None]


async def test_releases_made_with_acquires_are_written_with_them(
    storage: ScratchPostgres,
) -> None:
    await make_pool(storage, 2, max_concurrency=2)
    await warm(storage)
    held = [lease for lease in await together(storage, 4) if lease is not None]
    assert len(held) == 4
    # Made in one turn with acquires, the releases wait for the acquires' statement and are
    # written by it; a lease released twice in the batch is released once.
    results = await asyncio.gather(
        *(storage.acquire(LeaseRequest("p"), holder="h1", now=NOW) for _ in range(2)),
        *(storage.release(lease) for lease in held),
        storage.release(held[0]),
    )
    acquired, released = results[:2], results[2:]
    assert released == [True, True, True, True, False]
    # The pick ran before the releases were counted off: the pool was full, so the acquires
    # found it busy; the capacity is back for the next ones.
    assert acquired == [None, None]
    assert await counts_in_database(storage) == [(0, 0)] * 2
    again = await together(storage, 4)
    assert all(lease is not None for lease in again)
    assert await counts_in_database(storage) == [(2, 2)] * 2


async def test_a_release_nobody_waits_for_waits_a_moment_for_an_acquire_to_carry_it(
    storage: ScratchPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_pool(storage, 2)
    await warm(storage)
    fast = storage._fast
    assert fast is not None
    fetch = fast._fetch
    statements: list[str] = []

    async def named(statement: Compiled, params: dict[str, Any]) -> Any:
        kind = "acquire" if "p_pool" in params else "release"
        statements.append(
            kind + (" with releases" if "p_pool" in params and "p_leases" in params else "")
        )
        return await fetch(statement, params)

    monkeypatch.setattr(fast, "_fetch", named)
    first = await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW)
    assert first is not None
    released = storage.release_nowait(first)
    assert released is not None
    await asyncio.sleep(0)  # an acquire comes a loop turn later: the release rides with it
    second = await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW)
    assert await released is True
    assert statements == ["acquire", "acquire with releases"]
    # With no acquire coming, it goes out alone all the same.
    assert second is not None
    alone = storage.release_nowait(second)
    assert alone is not None
    assert await asyncio.wait_for(alone, 5) is True
    assert statements[2:] == ["release"]
    assert await counts_in_database(storage) == [(0, 0)] * 2


@asynccontextmanager
async def holding_one(storage: ScratchPostgres) -> AsyncIterator[tuple[LeaseManager, Lease]]:
    """A lease manager on the storage (which knows the pool by now) and a lease it holds;
    on leaving, every lease must be back and none released twice."""
    await make_pool(storage, 2)
    manager = LeaseManager(storage, instance_id="gw-test", sweep_interval=3600)
    async with manager:
        await manager.put_back(await manager.acquire(LeaseRequest("p"), 5))
        yield manager, await manager.acquire(LeaseRequest("p"), 5)
        assert await counts_in_database(storage) == [(0, 0)] * 2
        assert manager.double_releases == 0


async def test_a_release_whose_statement_failed_is_kept_and_written_later(
    storage: ScratchPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with holding_one(storage) as (manager, lease):
        fast = storage._fast
        assert fast is not None
        fetch = fast._fetch

        async def unanswered(statement: Compiled, params: dict[str, Any]) -> Any:
            if "p_leases" in params and "p_pool" in params:
                raise StorageUnavailable("storage database unavailable: test")
            return await fetch(statement, params)

        monkeypatch.setattr(fast, "_fetch", unanswered)
        acquiring = asyncio.ensure_future(manager.acquire(LeaseRequest("p"), 5))
        releasing = asyncio.ensure_future(manager.put_back(lease))
        assert await releasing is True  # kept for later
        with pytest.raises(StorageUnavailable):
            await acquiring
        monkeypatch.setattr(fast, "_fetch", fetch)
        await manager.sweep()


async def test_a_release_cut_off_before_it_answered_is_kept_and_written_later(
    storage: ScratchPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release sent without waiting whose statement ends cancelled (cut off mid-way) is kept
    like one the storage could not take, not dropped: the lease would stay held for good."""
    async with holding_one(storage) as (manager, lease):
        fast = storage._fast
        assert fast is not None
        fetch = fast._fetch

        cut = asyncio.Event()

        async def cut_off(statement: Compiled, params: dict[str, Any]) -> Any:
            if "p_pool" not in params:
                cut.set()
                raise asyncio.CancelledError()
            return await fetch(statement, params)

        monkeypatch.setattr(fast, "_fetch", cut_off)
        manager.give_back(lease)  # sent without waiting
        await asyncio.wait_for(cut.wait(), 5)
        await asyncio.sleep(0)  # the release's answer (cancelled) is read
        assert sorted(await counts_in_database(storage)) == [(0, 0), (1, 1)]  # still held
        monkeypatch.setattr(fast, "_fetch", fetch)
        await manager.sweep()


def scans(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(node type, table) of every node of `plan` that reads a table."""
    found = []
    if "Relation Name" in plan:
        found.append((plan["Node Type"], plan["Relation Name"]))
    for child in plan.get("Plans", []):
        found.extend(scans(child))
    return found


async def test_every_hot_statement_finds_its_rows_through_an_index(
    storage: ScratchPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each lease and release leaves a dead row behind until a vacuum, and a plan made once
    while the tables were small would read them all (a sequential scan is cheapest on a
    small table): the statements would slow down as the tables grow. Every statement the
    lanes run (those `warm_up` prepares, and releases riding with acquires) is planned again
    on a lane with the arguments it ran with: none may scan a table from end to end."""
    await make_pool(storage, 4)
    await warm(storage)
    lanes, fast = storage._lanes, storage._fast
    assert lanes is not None
    assert fast is not None
    ran: dict[str, list[Any]] = {}
    fetchrow = lanes.fetchrow

    async def noting(sql: str, args: list[Any]) -> Any:
        ran[sql] = args
        return await fetchrow(sql, args)

    monkeypatch.setattr(lanes, "fetchrow", noting)
    await fast.warm_up()
    held = [lease for lease in await together(storage, 2) if lease is not None]
    await asyncio.gather(
        *(storage.acquire(LeaseRequest("p"), holder="h1", now=NOW) for _ in range(2)),
        *(storage.release(lease) for lease in held),
    )
    monkeypatch.undo()
    assert len(ran) >= 7  # acquires: one, many, waiting, releasing; releases: one, many; renew
    for sql, args in ran.items():
        row = await lanes.fetchrow("EXPLAIN (FORMAT JSON) " + sql, args)
        # The engine's connections decode json themselves; a bare one would give text.
        (plan,) = json.loads(row[0]) if isinstance(row[0], str) else row[0]
        read = scans(plan["Plan"])
        assert read, sql
        assert not [scan for scan in read if scan[0] == "Seq Scan"], (read, sql)
