"""Gateway-like processes for the multi-process storage tests (run as `python -m ...`).

`lease SCHEMA PAIRS START_AT OUT`: acquire and release PAIRS times through a LeaseManager on
the PostgreSQL schema, from 4 tasks, starting at the wall-clock time START_AT; write one JSON
line per lease to OUT: upstream id, and the monotonic times just after it was granted and just
before it was given back (inside the real lease, so two of them overlapping on one upstream
proves an over-lease).

`hold SCHEMA COUNT`: lease COUNT upstreams and hold them, heartbeating, until killed; prints
`held` once they are all out.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvloop

from core.leasing import LeaseManager
from core.models import LeaseRequest
from core.storage.sql import SQLStorage
from tests.storage.scratch import POSTGRES_URL

TASKS = 4


async def lease(schema: str, pairs: int, start_at: float) -> list[tuple[str, float, float]]:
    storage = SQLStorage(POSTGRES_URL, schema=schema, lanes=TASKS, pool_size=2)
    await storage.open()
    records: list[tuple[str, float, float]] = []
    async with LeaseManager(storage, poll_interval=0.002) as manager:
        # Every process has seen the pool before the clock starts (one full acquire each).
        first = await manager.acquire(LeaseRequest("p"), timeout=30.0)
        await manager.release(first)
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def worker(count: int) -> None:
            for _ in range(count):
                held = await manager.acquire(LeaseRequest("p"), timeout=30.0)
                granted = time.monotonic()
                await asyncio.sleep(0)
                records.append((held.upstream.id, granted, time.monotonic()))
                await manager.release(held)

        await asyncio.gather(*(worker(pairs // TASKS) for _ in range(TASKS)))
    await storage.close()
    return records


async def hold(schema: str, count: int) -> None:
    storage = SQLStorage(POSTGRES_URL, schema=schema, heartbeat_interval=0.2)
    await storage.open()
    for _ in range(count):
        lease_ = await storage.acquire(LeaseRequest("p"), holder="doomed", now=time.time())
        assert lease_ is not None
    print("held", flush=True)
    await asyncio.Event().wait()  # until SIGKILL


def main(argv: list[str]) -> None:
    command, schema, *rest = argv
    if command == "lease":
        records = uvloop.run(lease(schema, int(rest[0]), float(rest[1])))
        with open(rest[2], "w") as sink:
            for record in records:
                sink.write(json.dumps(record) + "\n")
    elif command == "hold":
        uvloop.run(hold(schema, int(rest[0])))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
