"""PostgreSQL down for longer than the holder grace, for every process at once (a restart of a
private server): when it is back, the first sweeps must not take the leases of holders that
simply had no chance to beat yet. A holder that stays silent for a whole grace after the
return is still judged dead, as a crashed one is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from core.errors import StorageUnavailable
from core.models import Lease, LeaseRequest, Pool, Upstream
from core.storage.sql import SQLStorage
from tests.storage.private_postgres import PrivatePostgres, upgraded_private_postgres

pytestmark = pytest.mark.slow

GRACE = 1.0


@pytest.fixture
async def postgres() -> AsyncIterator[PrivatePostgres]:
    async with upgraded_private_postgres() as server:
        yield server


async def first_sweep_after_return(storage: SQLStorage) -> list[Lease]:
    """Sweep until the storage answers (its pooled connections died with the server)."""
    deadline = time.monotonic() + 15.0
    while True:
        try:
            return await storage.release_expired(time.time())
        except StorageUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_a_sweep_after_a_long_outage_waits_a_grace_before_judging_holders(
    postgres: PrivatePostgres,
) -> None:
    sweeper = SQLStorage(postgres.url, holder_grace=GRACE, heartbeat_interval=0.2)
    # Beats only when it leases: silent from its lease on, as a process the outage hid.
    silent = SQLStorage(postgres.url, holder_grace=GRACE, heartbeat_interval=3600)
    await sweeper.open()
    await silent.open()
    try:
        await sweeper.add_pool(Pool("p", max_concurrency=1))
        await sweeper.add_upstreams(
            Upstream.from_url(f"http://10.2.0.{i}:8080", "p") for i in (1, 2)
        )
        ours = await sweeper.acquire(LeaseRequest("p"), holder="sweeper", now=time.time())
        theirs = await silent.acquire(LeaseRequest("p"), holder="silent", now=time.time())
        assert ours is not None
        assert theirs is not None

        await postgres.stop()
        await asyncio.sleep(GRACE * 2.5)  # every holder's last beat is now older than the grace
        await postgres.start()
        assert await first_sweep_after_return(sweeper) == []

        # The silent holder stays silent for a whole grace after the return: dead now.
        taken: list[Lease] = []
        deadline = time.monotonic() + 15.0
        while not taken and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            taken = await sweeper.release_expired(time.time())
        assert [lease.id for lease in taken] == [theirs.id]
        assert [lease.id for lease in await sweeper.list_leases()] == [ours.id]
    finally:
        await silent.close()
        await sweeper.close()
