from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from core.clock import ManualClock
from core.leasing import LeaseManager
from core.models import Pool, Selector, Upstream
from core.storage.interface import Storage
from core.storage.memory import MemoryStorage

StorageFactory = Callable[[], Storage]

#: Every storage adapter runs the whole contract suite; SQL adapters add themselves here.
ADAPTERS: dict[str, StorageFactory] = {"memory": MemoryStorage}


@pytest.fixture(params=sorted(ADAPTERS))
async def storage(request: pytest.FixtureRequest) -> AsyncIterator[Storage]:
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
