"""A PostgreSQL database that stops answering (here: a table locked by someone else) fails the
storage's calls as StorageUnavailable after its statement timeout instead of holding them for
as long as TCP would; once it answers again, so does the storage."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from core.errors import StorageUnavailable
from core.models import LeaseRequest, Pool, Upstream
from tests.storage.scratch import POSTGRES_URL, ScratchPostgres, open_scratch_postgres


@pytest.fixture
async def storage() -> AsyncIterator[ScratchPostgres]:
    async with open_scratch_postgres(statement_timeout=0.5) as scratch:
        yield scratch


async def test_a_statement_left_unanswered_fails_as_unavailable(storage: ScratchPostgres) -> None:
    await storage.add_pool(Pool("p"))
    await storage.add_upstreams([Upstream.from_url("http://10.3.0.1:8080", "p")])
    lease = await storage.acquire(LeaseRequest("p"), holder="h", now=time.time())
    assert lease is not None
    assert await storage.release(lease)

    blocker = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute(f'LOCK TABLE "{storage.schema}".leases IN ACCESS EXCLUSIVE MODE')
        with pytest.raises(StorageUnavailable):
            await storage.acquire(LeaseRequest("p"), holder="h", now=time.time())
        with pytest.raises(StorageUnavailable):
            await storage.list_leases()
        await transaction.rollback()
    finally:
        await blocker.close()

    lease = await storage.acquire(LeaseRequest("p"), holder="h", now=time.time())
    assert lease is not None
    assert [held.id for held in await storage.list_leases()] == [lease.id]
    assert await storage.release(lease)
