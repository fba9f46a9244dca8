"""The harness's parts on their own: histogram, fault specs, the leak check, the fleet's faults."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from loadtest import procstat
from loadtest.client import ClientError, Counters, Plan, open_conn
from loadtest.fleet import SimUpstream
from loadtest.hdr import Histogram, bucket_of, highest_in
from loadtest.idle import FD_MARGIN, SPREAD, fleet_layout
from loadtest.origin import BuiltinOrigin
from loadtest.runner import drain_check
from loadtest.targets import Running
from loadtest.toxics import ToxicError, Toxics, parse_step
from loadtest.wrk import WrkError
from loadtest.wrk import parse as parse_wrk


def test_histogram_percentiles_are_within_a_tenth_of_a_percent() -> None:
    values = [*range(1, 10_001), random.Random(7).randrange(10**6, 10**9)]
    hist = Histogram()
    for value in values:
        hist.record(value)
    ordered = sorted(values)
    for percent in (50, 90, 99, 99.9):
        exact = ordered[max(0, int(len(ordered) * percent / 100 + 0.999999) - 1)]
        assert exact <= hist.percentile(percent) <= exact * 1.001 + 1
    assert hist.max == max(values)
    assert hist.count == len(values)


def test_histogram_buckets_cover_every_value_once() -> None:
    for value in (*range(0, 5000), 2**20, 2**20 + 1, 10**9, 2**40 - 1):
        bucket = bucket_of(value)
        assert highest_in(bucket) >= value
        assert bucket == 0 or highest_in(bucket - 1) < value


def test_histogram_merges_and_round_trips() -> None:
    a, b = Histogram(), Histogram()
    for value in range(100):
        a.record(value * 1000)
        b.record(value * 3000)
    a.merge(b)
    again = Histogram.from_json(a.to_json())
    assert again.count == 200
    assert again.percentile(99) == a.percentile(99)


def test_toxics_parse_and_describe() -> None:
    toxics = Toxics.parse("latency=200,jitter=50,bandwidth=100")
    assert toxics == Toxics(latency=200, jitter=50, bandwidth=100)
    assert toxics.shapes
    assert Toxics.parse("timeout=0").timeout == 0
    assert Toxics.parse("down").down
    assert Toxics.parse("clear").clean
    assert Toxics.parse("limit_data=10").describe() == "limit_data=10"
    step = parse_step("2.5:1-3,6:reset_peer=0", 8)
    assert step.upstreams == (1, 2, 3, 6)
    assert step.describe() == "2.5s upstreams 1-3,6: reset_peer=0"


@pytest.mark.parametrize(
    "spec", ["1:0:nosuch=1", "1:0:latency", "1:0:latency=-1", "x:0:down", "1:9:down", "1:down"]
)
def test_bad_fault_specs_say_what_is_wrong(spec: str) -> None:
    with pytest.raises(ToxicError):
        parse_step(spec, 4)


async def _fake_admin(held: list[int]) -> tuple[web.AppRunner, tuple[str, int]]:
    async def stats(request: web.Request) -> web.Response:
        now = held.pop(0) if len(held) > 1 else held[0]
        pool = {"leases_held": now, "total_leases": 10}
        return web.json_response({"pools": {"bench": pool}})

    app = web.Application()
    app.router.add_get("/api/stats", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, (host, port)


async def test_leak_check_waits_for_leases_to_come_back() -> None:
    runner, address = await _fake_admin([3, 1, 0])
    try:
        target = Running("proxygate", address, None, None, admin=address)
        leases = await drain_check(target, wait=5.0)
    finally:
        await runner.cleanup()
    assert leases == {"acquired": 10, "released": 10, "held_after_drain": 0, "leaked": 0}


async def test_leak_check_reports_what_is_still_held() -> None:
    runner, address = await _fake_admin([2])
    try:
        target = Running("proxygate", address, None, None, admin=address)
        leases = await drain_check(target, wait=0.3)
    finally:
        await runner.cleanup()
    assert leases["leaked"] == 2
    assert leases["released"] == 8


async def test_fleet_upstream_faults(tmp_path: Path) -> None:
    origin = BuiltinOrigin("127.0.0.2", tmp_path)
    address = await origin.start()
    upstream = SimUpstream(0, "http")
    await upstream.start()
    counters = Counters()
    plan = Plan("http", (upstream.host, upstream.port), (address.host, address.port), "/who")
    try:
        conn = await open_conn(plan, counters, None)
        response = await conn.request(plan.request(None), capture=True)
        assert response.status == 200
        assert response.body == upstream.host.encode()  # left from its own address
        conn.close()

        await upstream.apply(Toxics.parse("down"))
        with pytest.raises(ConnectionRefusedError):
            await open_conn(plan, counters, None)

        await upstream.apply(Toxics.parse("reset_peer=0"))
        conn = await open_conn(plan, counters, None)
        with pytest.raises(ClientError) as failure:
            await asyncio.wait_for(conn.request(plan.request(None)), 5.0)
        assert failure.value.kind in ("reset", "closed")

        await upstream.apply(Toxics.parse("limit_data=20"))
        conn = await open_conn(plan, counters, None)
        with pytest.raises(ClientError):
            await asyncio.wait_for(conn.request(plan.request(None)), 5.0)

        await upstream.apply(Toxics.parse("timeout=0"))
        conn = await open_conn(plan, counters, None)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.request(plan.request(None)), 0.3)
        conn.abort()

        await upstream.apply(Toxics())
        conn = await open_conn(plan, counters, None)
        assert (await conn.request(plan.request(None))).status == 200
        conn.close()
    finally:
        await upstream.stop()
        await origin.stop()


@pytest.mark.parametrize(
    ("tunnels", "limit"), [(10_000, 20_000), (10_000, 1_024), (50, 1_024), (1, 100)]
)
def test_idle_fleet_layout_keeps_every_process_within_its_files(tunnels: int, limit: int) -> None:
    layout = fleet_layout(tunnels, 4, limit)
    assert sum(layout.shards) == layout.upstreams >= 4
    per_upstream = 2 * math.ceil(tunnels * SPREAD / layout.upstreams)
    assert max(layout.shards) * per_upstream + FD_MARGIN <= limit


def test_idle_fleet_layout_uses_few_processes() -> None:
    assert fleet_layout(10_000, 4, 20_000).shards == (3, 1)
    assert fleet_layout(50, 4, 1_024).shards == (4,)


# Fifty rounds of eight 256 KiB reads' worth of memory, allocated and freed: 25,600 pages
# touched. glibc's defaults give the freed blocks back to the kernel and fault them in again
# (24,000 faults here); kept, they are reused.
_CHURN = """
import resource
from loadtest import procs
assert procs.keep_freed_memory()
def churn():
    for _ in range(50):
        blocks = [bytearray(256 * 1024) for _ in range(8)]
        del blocks
churn()  # the first rounds grow the heap either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_harness_processes_keep_the_memory_they_free() -> None:
    # In a process of its own: the test run's allocator keeps its defaults.
    repo = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", _CHURN]
    faults = int(subprocess.run(command, cwd=repo, capture_output=True, check=True).stdout)
    assert faults < 256


def test_a_process_tree_is_found_whole_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    # A child, and a child with a child of its own (it says so once both are started).
    tree = subprocess.Popen(
        ["sh", "-c", "sleep 30 & (sleep 30 & echo started; wait) & wait"],
        stdout=subprocess.PIPE,
    )
    found = [tree.pid]
    try:
        assert tree.stdout is not None
        tree.stdout.readline()
        tree.stdout.close()
        found = procstat.descendants(tree.pid)
        assert found[0] == tree.pid
        assert len(found) >= 4  # sh, sleep, the subshell and its sleep
        monkeypatch.setattr(procstat, "_children", lambda pid: None)  # no children lists
        assert sorted(procstat.descendants(tree.pid)) == sorted(found)
    finally:
        for pid in reversed(found):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        tree.wait()


def test_a_process_gone_has_no_tree() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert procstat.descendants(gone.pid) == [gone.pid]
    assert procstat.sample(gone.pid).cpu == 0.0


def test_wrk_output_becomes_a_load_result() -> None:
    # done()'s lines: duration (us), answers, bytes, then errors by kind, then each latency
    # (us) with its count; wrk's own report lines are ignored.
    result = parse_wrk(
        "Running 5s test @ http://127.0.0.1:8080/\n"
        "total 5000000 1000 250000 0 1 0 10 2\n"
        "latency 900 500\n"
        "latency 1100 499\n"
        "latency 25000 1\n"
    )
    assert (result.requests, result.bytes, result.seconds) == (990, 250_000, 5.0)
    assert result.errors == {"read": 1, "status": 10, "timeout": 2}
    assert result.histogram.count == 1000
    assert result.histogram.max == 25_000_000
    assert 900_000 <= result.histogram.percentile(50) < 1_000_000
    with pytest.raises(WrkError, match="no summary"):
        parse_wrk("unable to connect to 127.0.0.1:8080 Connection refused\n")
