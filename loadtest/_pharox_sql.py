"""The pharox half of `bench_core --storage`: pharox 0.11 on PostgreSQL, one case, as JSON.

Runs only inside the benchmark's own virtualenv (`loadtest/.bench-venv`, with pharox's
`postgres` and `async` extras), never in the project's: pharox is no dependency of proxygate.
It prints exactly one JSON object on stdout.

One run is one case: `--tasks` asyncio tasks doing acquire+release pairs for `--seconds` on a
pool of `--pool-size` active, unlimited proxies, round robin, in the schema `--schema` (made
and dropped by the caller; this builds pharox's tables in it). Two paths, `--path`:

- `manager`: what pharox ships for asyncio callers, `acquire_proxy_async` /
  `release_proxy_async` (each call runs the synchronous `ProxyManager` in a worker thread)
  over `PostgresStorage` (SQLAlchemy, psycopg 3).
- `adapter`: pharox's `AsyncPostgresStorage` (SQLAlchemy async, asyncpg), called in the order
  `ProxyManager.acquire_proxy` / `release_proxy` call their storage (pharox has no async
  manager to do it): ensure the consumer, clean up expired leases, find, lease, pool stats;
  release, pool stats. Nothing else is added and nothing is left out.

Both get as much room as the case needs: a connection pool of `tasks` (plus overflow) and, for
`manager`, a thread pool of `tasks` workers, so that 16 tasks really run 16 at a time. With
more than one task each lease is held across one `asyncio.sleep(0)`, as on proxygate's side.
pharox keeps every released lease as a row, so its tables grow as a case runs: each case starts
on an empty schema, and its rate is pairs over the whole case.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

# Run as a script, this file has its own folder on sys.path, and `_pharox_core` in it.
from _pharox_core import POOL, loop_factory, proxies  # type: ignore[import-not-found]
from pharox import (
    Lease,
    ProxyManager,
    ProxyPool,
    SelectorStrategy,
    acquire_proxy_async,
    release_proxy_async,
)
from pharox.storage.postgres import AsyncPostgresStorage, PostgresStorage, metadata
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

CONSUMER = ProxyManager.DEFAULT_CONSUMER_NAME
ROUND_ROBIN = SelectorStrategy.ROUND_ROBIN
DURATION = 300  # seconds; pharox's default, longer than any case

Pair = Callable[[], Awaitable[None]]


def driver_url(url: str, driver: str) -> Any:
    return make_url(url).set(drivername=f"postgresql+{driver}")


async def manager_path(
    url: str, schema: str, size: int, tasks: int
) -> tuple[Pair, Callable[[], Awaitable[None]]]:
    engine = create_engine(
        driver_url(url, "psycopg"),
        pool_size=tasks,
        max_overflow=4,
        connect_args={"options": f"-csearch_path={schema}"},
    )
    metadata.create_all(engine)
    storage = PostgresStorage(engine)
    pool = ProxyPool(name=POOL)
    storage.save_pool(pool)
    storage.add_proxies_bulk(proxies(pool, size))
    manager = ProxyManager(storage)
    executor = ThreadPoolExecutor(max_workers=tasks, thread_name_prefix="pharox")
    asyncio.get_running_loop().set_default_executor(executor)

    async def pair() -> None:
        lease = await acquire_proxy_async(manager, POOL, selector=ROUND_ROBIN)
        if lease is None:
            raise RuntimeError("pharox found no available proxy in an unlimited pool")
        if tasks > 1:
            await asyncio.sleep(0)
        await release_proxy_async(manager, lease)

    async def close() -> None:
        executor.shutdown(wait=True)
        engine.dispose()

    return pair, close


async def adapter_path(
    url: str, schema: str, size: int, tasks: int
) -> tuple[Pair, Callable[[], Awaitable[None]]]:
    engine = create_async_engine(
        driver_url(url, "asyncpg"),
        pool_size=tasks,
        max_overflow=4,
        connect_args={"server_settings": {"search_path": schema}},
    )
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    storage = AsyncPostgresStorage(engine)
    pool = ProxyPool(name=POOL)
    await storage.save_pool(pool)
    await storage.add_proxies_bulk(proxies(pool, size))

    async def acquire() -> Lease | None:
        # ProxyManager.acquire_proxy's calls, in its order (the callbacks' payload included).
        await storage.ensure_consumer(CONSUMER)
        await storage.cleanup_expired_leases()
        proxy = await storage.find_available_proxy(POOL, None, ROUND_ROBIN)
        lease = None
        if proxy is not None:
            lease = await storage.create_lease(proxy, CONSUMER, DURATION)
        await storage.get_pool_stats(POOL)
        return lease

    async def release(lease: Lease) -> None:
        # ProxyManager.release_proxy's calls, in its order.
        lease.released_at = lease.released_at or datetime.now(UTC)
        await storage.release_lease(lease)
        await storage.get_pool_stats(lease.pool_name)

    async def pair() -> None:
        lease = await acquire()
        if lease is None:
            raise RuntimeError("pharox found no available proxy in an unlimited pool")
        if tasks > 1:
            await asyncio.sleep(0)
        await release(lease)

    return pair, engine.dispose


PATHS = {"manager": manager_path, "adapter": adapter_path}
DESCRIPTIONS = {
    "manager": "acquire_proxy_async/release_proxy_async (asyncio.to_thread) over "
    "ProxyManager(PostgresStorage), psycopg 3",
    "adapter": "AsyncPostgresStorage (asyncpg), called as ProxyManager calls its storage",
}


async def run_case(pair: Pair, tasks: int, seconds: float) -> dict[str, Any]:
    stamps: list[float] = []

    async def worker(deadline: float) -> None:
        while time.perf_counter() < deadline:
            await pair()
            stamps.append(time.perf_counter())

    gc.collect()
    cpu_started = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker(started + seconds) for _ in range(tasks)))
    ended = time.perf_counter()
    elapsed = ended - started
    window = min(1.0, elapsed / 2)
    return {
        "pairs": len(stamps),
        "seconds": elapsed,
        "rate": len(stamps) / elapsed,
        "first_window_rate": sum(1 for t in stamps if t <= started + window) / window,
        "last_window_rate": sum(1 for t in stamps if t > ended - window) / window,
        "window_seconds": window,
        "cpu_share": (time.process_time() - cpu_started) / elapsed,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    pair, close = await PATHS[args.path](args.url, args.schema, args.pool_size, args.tasks)
    try:
        await run_case(pair, args.tasks, args.warmup)
        return await run_case(pair, args.tasks, args.seconds)
    finally:
        await close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="postgresql://host:port/database")
    parser.add_argument("--schema", required=True, help="an empty schema, made by the caller")
    parser.add_argument("--path", choices=sorted(PATHS), required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the case")
    parser.add_argument("--warmup", type=float, default=0.5, help="untimed run before it")
    parser.add_argument("--pool-size", type=int, default=32)
    args = parser.parse_args(argv)

    factory, loop_name = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        case = runner.run(measure(args))
    case |= {
        "tasks": args.tasks,
        "path": DESCRIPTIONS[args.path],
        "pharox_version": version("pharox"),
        "sqlalchemy_version": version("sqlalchemy"),
        "python": sys.version.split()[0],
        "loop": loop_name,
    }
    print(json.dumps(case))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
