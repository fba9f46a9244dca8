"""The pharox half of `loadtest.bench_core`: acquire+release pairs of pharox 0.11, as JSON.

Runs only inside the benchmark's own virtualenv (`loadtest/.bench-venv`), never in the
project's: pharox is no dependency of proxygate. It prints exactly one JSON object on stdout.

The path measured is the async one pharox ships for asyncio callers:
`pharox.acquire_proxy_async` / `pharox.release_proxy_async` driving a `ProxyManager` over
`InMemoryStorage` (each call runs the synchronous manager in a worker thread through
`asyncio.to_thread`). `AsyncInMemoryStorage` is not an alternative: it is a storage adapter
whose methods are coroutines, and pharox's only manager, `ProxyManager`, calls its storage
synchronously, so it cannot drive it. The plain synchronous `ProxyManager` loop is measured too,
as a reference without the thread hop.

pharox's in-memory store keeps every past lease (and scans them all on each acquire), so its
rate falls the longer it runs: each case is bounded by time, not by a count, and starts on a
fresh store. The rate reported is pairs over the whole run; the first and last second are
reported as well, to show the decay.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from pharox import (
    InMemoryStorage,
    Proxy,
    ProxyManager,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    SelectorStrategy,
    acquire_proxy_async,
    release_proxy_async,
)

POOL = "bench"
ROUND_ROBIN = SelectorStrategy.ROUND_ROBIN
PATH = (
    "pharox.acquire_proxy_async/release_proxy_async (asyncio.to_thread) over "
    "ProxyManager(InMemoryStorage())"
)


def proxies(pool: ProxyPool, size: int) -> list[Proxy]:
    """`size` active proxies with no concurrency limit, in `pool` (also `_pharox_sql`'s)."""
    return [
        Proxy(
            host=f"10.0.{i // 250}.{i % 250 + 1}",
            port=8080,
            protocol=ProxyProtocol.HTTP,
            pool_id=pool.id,
            status=ProxyStatus.ACTIVE,
        )
        for i in range(size)
    ]


def build_manager(pool_size: int) -> ProxyManager:
    """A fresh store with one pool of `pool_size` active, unlimited proxies."""
    storage = InMemoryStorage()
    pool = ProxyPool(name=POOL)
    storage.add_pool(pool)
    storage.add_proxies_bulk(proxies(pool, pool_size))
    return ProxyManager(storage)


async def async_worker(
    manager: ProxyManager, deadline: float, hold: bool, stamps: list[float]
) -> None:
    """Acquire+release until `deadline`; `hold` keeps the lease across one loop turn."""
    while time.perf_counter() < deadline:
        lease = await acquire_proxy_async(manager, POOL, selector=ROUND_ROBIN)
        if lease is None:
            raise RuntimeError("pharox found no available proxy in an unlimited pool")
        if hold:
            await asyncio.sleep(0)
        await release_proxy_async(manager, lease)
        stamps.append(time.perf_counter())


async def run_async_case(pool_size: int, tasks: int, seconds: float) -> dict[str, Any]:
    manager = build_manager(pool_size)
    stamps: list[float] = []
    hold = tasks > 1
    gc.collect()
    cpu_started = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(async_worker(manager, deadline, hold, stamps) for _ in range(tasks)))
    return summarize(stamps, started, time.perf_counter(), time.process_time() - cpu_started)


def run_sync_case(pool_size: int, seconds: float) -> dict[str, Any]:
    manager = build_manager(pool_size)
    stamps: list[float] = []
    gc.collect()
    cpu_started = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        lease = manager.acquire_proxy(POOL, selector=ROUND_ROBIN)
        if lease is None:
            raise RuntimeError("pharox found no available proxy in an unlimited pool")
        manager.release_proxy(lease)
        stamps.append(time.perf_counter())
    return summarize(stamps, started, time.perf_counter(), time.process_time() - cpu_started)


def summarize(
    stamps: list[float], started: float, ended: float, cpu_seconds: float
) -> dict[str, Any]:
    """Pairs over the whole run, plus the rate in its first and its last second.

    `cpu_share` is the process's CPU time (all its threads) over the wall time.
    """
    elapsed = ended - started
    window = min(1.0, elapsed / 2)
    first = sum(1 for t in stamps if t <= started + window)
    last = sum(1 for t in stamps if t > ended - window)
    per_second = [0] * max(1, int(elapsed))  # the short tail folds into the last second
    for t in stamps:
        per_second[min(int(t - started), len(per_second) - 1)] += 1
    return {
        "pairs": len(stamps),
        "seconds": elapsed,
        "rate": len(stamps) / elapsed,
        "first_window_rate": first / window,
        "last_window_rate": last / window,
        "window_seconds": window,
        "pairs_per_second_series": per_second,
        "cpu_share": cpu_seconds / elapsed,
    }


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop, "asyncio"
    return uvloop.new_event_loop, f"uvloop {version('uvloop')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each case")
    parser.add_argument("--warmup", type=float, default=0.25, help="untimed run before each")
    parser.add_argument("--pool-size", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=64, help="tasks of the concurrent case")
    args = parser.parse_args(argv)

    factory, loop_name = loop_factory()
    cases: dict[str, dict[str, Any]] = {}
    with asyncio.Runner(loop_factory=factory) as runner:
        for name, tasks in (("async_1_task", 1), (f"async_{args.tasks}_tasks", args.tasks)):
            runner.run(run_async_case(args.pool_size, tasks, args.warmup))  # warm-up
            cases[name] = runner.run(run_async_case(args.pool_size, tasks, args.seconds))
            cases[name]["tasks"] = tasks
    run_sync_case(args.pool_size, args.warmup)  # warm-up
    cases["sync_1_thread"] = run_sync_case(args.pool_size, args.seconds)
    cases["sync_1_thread"]["tasks"] = 1

    result = {
        "pharox_version": version("pharox"),
        "python": sys.version.split()[0],
        "loop": loop_name,
        "path": PATH,
        "pool_size": args.pool_size,
        "selector": ROUND_ROBIN.value,
        "seconds_per_case": args.seconds,
        "concurrent_hold": "the lease is held across one asyncio.sleep(0) when tasks > 1",
        "cases": cases,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
