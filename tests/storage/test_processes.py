"""Several processes on one PostgreSQL database: no upstream is ever over-leased, round robin
stays fair across them, and a killed process's leases come back on their own."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.models import LeaseRequest, Pool, Selector, Upstream
from core.storage.sql import SQLStorage, upgrade
from tests.conftest import skip_or_fail
from tests.storage.scratch import POSTGRES_URL, drop_schema, make_schema, postgres_unavailable

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    if reason := await postgres_unavailable():
        skip_or_fail(reason)
    name = await make_schema("pgprocs")
    try:
        await upgrade(POSTGRES_URL, schema=name)
        yield name
    finally:
        await drop_schema(name)


async def make_pool(schema: str, size: int) -> None:
    storage = SQLStorage(POSTGRES_URL, schema=schema)
    await storage.open()
    try:
        await storage.add_pool(Pool("p", selector=Selector.ROUND_ROBIN, max_concurrency=1))
        await storage.add_upstreams(
            Upstream.from_url(f"http://10.9.0.{i + 1}:8080", "p") for i in range(size)
        )
    finally:
        await storage.close()


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.storage.workers",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_four_processes_never_over_lease_and_share_one_rotation(
    schema: str, tmp_path: Path
) -> None:
    processes, pairs, size = 4, 2_000, 32
    await make_pool(schema, size)
    start_at = time.time() + 3.0
    outputs = [tmp_path / f"leases-{n}.jsonl" for n in range(processes)]
    children = [
        await spawn("lease", schema, str(pairs), str(start_at), str(out)) for out in outputs
    ]
    codes = await asyncio.wait_for(asyncio.gather(*(c.wait() for c in children)), timeout=60)
    assert codes == [0] * processes

    intervals: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for out in outputs:
        for line in out.read_text().splitlines():
            upstream_id, granted, returned = json.loads(line)
            intervals[upstream_id].append((granted, returned))
    assert sum(len(spans) for spans in intervals.values()) == processes * pairs
    # max_concurrency = 1: on each upstream, every lease ends before the next begins.
    for upstream_id, spans in intervals.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"{upstream_id} leased twice at once"
    # One rotation for all processes: every upstream serves its share (250 here), give or
    # take what the timing of four processes racing for eight slots makes of it.
    counts = [len(spans) for spans in intervals.values()]
    assert len(counts) == size
    share = processes * pairs / size
    assert min(counts) >= 0.8 * share, counts
    assert max(counts) <= 1.2 * share, counts


async def test_a_killed_holders_leases_come_back_after_the_grace_period(schema: str) -> None:
    held, grace, sweep_every = 200, 2.0, 0.25
    await make_pool(schema, held)
    child = await spawn("hold", schema, str(held))
    assert child.stdout is not None
    assert await asyncio.wait_for(child.stdout.readline(), timeout=30) == b"held\n"

    survivor = SQLStorage(POSTGRES_URL, schema=schema, holder_grace=grace)
    await survivor.open()
    try:
        # All 200 are out: nothing for anyone else, and a sweep takes nothing from the living.
        assert await survivor.acquire(LeaseRequest("p"), holder="alive", now=time.time()) is None
        assert await survivor.release_expired(time.time()) == []
        child.send_signal(signal.SIGKILL)
        await child.wait()
        killed = time.monotonic()
        returned = 0
        while returned < held and time.monotonic() - killed < grace + 5.0:
            await asyncio.sleep(sweep_every)
            returned += len(await survivor.release_expired(time.time()))
        took = time.monotonic() - killed
        assert returned == held
        # The last heartbeat came at most 0.2 s before the kill; one sweep period after the
        # grace period, plus a little scheduling slack.
        assert grace - 0.5 <= took <= grace + sweep_every + 0.5, took

        # Every upstream is free again, exactly once each: the survivor can lease all 200 and
        # then nothing more.
        leases = []
        while lease := await survivor.acquire(LeaseRequest("p"), holder="alive", now=time.time()):
            leases.append(lease)
        assert len({lease.upstream.id for lease in leases}) == held == len(leases)
        stats = await survivor.stats("p", time.time())
        assert (stats.leases_held, stats.leased, stats.available) == (held, held, 0)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await survivor.close()
