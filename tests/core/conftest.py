from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from core.clock import ManualClock
from core.leasing import LeaseManager
from core.models import Pool, Selector, Upstream
from core.storage.interface import Storage
from core.storage.memory import MemoryStorage
from tests.conftest import skip_or_fail
from tests.storage.scratch import ScratchPostgres, ScratchSQLite, postgres_unavailable

StorageFactory = Callable[[], Storage]

#: Every storage adapter runs the whole contract suite. The SQL ones each get a database of
#: their own per test (a temporary SQLite file; a PostgreSQL schema, dropped afterwards).
ADAPTERS: dict[str, StorageFactory] = {
    "memory": MemoryStorage,
    "sqlite": ScratchSQLite,
    "postgresql": ScratchPostgres,
}


@pytest.fixture(params=sorted(ADAPTERS))
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
    if request.param == "postgresql" and (reason := await postgres_unavailable()):
        skip_or_fail(reason)
    store = ADAPTERS[request.param]()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def manager(storage: Storage, clock: ManualClock) -> AsyncIterator[LeaseManager]:
    # The sweeper is driven by hand (`manager.sweep()`) after stepping the clock.
    leases = LeaseManager(storage, clock=clock, instance_id="test-gw", sweep_interval=3600)
    async with leases:
        yield leases


def upstream(index: int, pool: str = "p", **attributes: object) -> Upstream:
    url = f"http://10.0.{index // 250}.{index % 250 + 1}:8080"
    return Upstream.from_url(url, pool, **attributes)


async def make_pool(
    storage: Storage,
    size: int,
    *,
    name: str = "p",
    selector: Selector = Selector.ROUND_ROBIN,
    max_concurrency: int | None = None,
    **pool_settings: object,
) -> list[Upstream]:
    await storage.add_pool(
        Pool(name, selector=selector, max_concurrency=max_concurrency, **pool_settings)  # type: ignore[arg-type]
    )
    members = [upstream(i, name) for i in range(size)]
    await storage.add_upstreams(members)
    return members
