"""`proxygate run --workers N` as a real process tree: workers share one port and the SQL storage
(so `max_concurrency` holds across them and /api/stats counts them all), SIGTERM stops every
worker, a worker that fails stops the rest, and workers never outlive their parent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from core.storage.sql import upgrade
from tests.support.net import free_port
from tests.support.processes import alive, all_gone

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
#: Bound on every wait for the process tree (start-up is a few Python interpreters).
WITHIN = 30.0


@dataclass
class Fleet:
    process: asyncio.subprocess.Process
    log: Path
    port: int
    admin_port: int

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def serving(self) -> list[int]:
        """The workers' pids, once the parent says they all serve."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WITHIN
        while True:
            found = re.search(r"workers serving \(pids ([\d ]+)\)", self.text())
            if found:
                return [int(pid) for pid in found.group(1).split()]
            if self.process.returncode is not None or loop.time() > deadline:
                pytest.fail(f"the workers did not start:\n{self.text()}")
            await asyncio.sleep(0.05)

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.process.wait(), WITHIN)


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, storage_url: str, *, workers: int = 2) -> AsyncIterator[Fleet]:
    """`proxygate run --workers N` on a fixed port over `storage_url`, a direct pool with
    max_concurrency 2; everything it started is gone on the way out."""
    port, admin_port = free_port(), free_port()
    config = tmp_path / "fleet.toml"
    config.write_text(
        f'[gateway]\nlisten = ["127.0.0.1:{port}"]\nacquire_timeout = 30.0\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n[checks]\nenabled = false\n'
        f'[storage]\nurl = "{storage_url}"\n'
        '[[pools]]\nname = "default"\nproxies = ["direct://"]\nmax_concurrency = 2\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGATE_")}
    env.pop("PYTHONWARNINGS", None)
    log = tmp_path / "fleet.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "run", "--config", str(config)),
            *("--workers", str(workers), "--log-level", "info"),
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=sink,
        )
    running = Fleet(process, log, port, admin_port)
    try:
        yield running
    finally:
        pids = [int(p) for p in re.findall(r"ready \(pid (\d+)\)", running.text())]
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in pids:  # only pids this test's parent started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    await upgrade(url)
    return url


class CountingOrigin:
    """Answers every request after `delay` seconds; counts the most in flight at once, and the
    gateway instances (from Via) that brought them."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.instances: set[str] = set()
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.instances.update(re.findall(r"gw-[0-9a-f]+", request.headers.get("Via", "")))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return web.Response(text="ok")


@pytest.fixture
async def counting_origin() -> AsyncIterator[CountingOrigin]:
    origin = CountingOrigin(delay=0.15)
    app = web.Application()
    app.router.add_get("/{tail:.*}", origin.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin.port = runner.addresses[0][1]
    try:
        yield origin
    finally:
        await runner.cleanup()


async def test_two_workers_share_one_port_and_one_concurrency_limit(
    tmp_path: Path, postgres_schema_url: str, counting_origin: CountingOrigin
) -> None:
    requests = 30
    async with fleet(tmp_path, postgres_schema_url) as running:
        pids = await running.serving()
        assert len(pids) == 2

        # A fresh connection per request, so the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as client:

            async def one() -> int:
                url = f"http://127.0.0.1:{counting_origin.port}/slow"
                async with client.get(url, proxy=f"http://127.0.0.1:{running.port}") as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.wait_for(
                asyncio.gather(*(one() for _ in range(requests))), WITHIN
            )
            assert statuses == [200] * requests
            # Both workers served, and together never more than the upstream's limit of 2.
            assert len(counting_origin.instances) == 2
            assert counting_origin.peak <= 2

            stats_url = f"http://127.0.0.1:{running.admin_port}/api/stats"
            async with client.get(stats_url) as response:
                assert response.status == 200
                stats = (await response.json())["pools"]["default"]
        # Every worker's leases, in one storage (grants a worker handed on to a waiter in line
        # count too, so under contention there are more grants than requests).
        assert stats["total_leases"] >= requests
        assert stats["leases_held"] == 0

        running.process.send_signal(signal.SIGTERM)
        assert await running.exit_code() == 0, running.text()
        assert await all_gone(pids, WITHIN)
        log = running.text()
        assert log.count("SIGTERM received: draining") == 2
        assert "Traceback" not in log


async def test_a_worker_that_dies_stops_the_others_and_the_parent_exits_1(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with fleet(tmp_path, sqlite_url) as running:
        first, second = await running.serving()
        os.kill(second, signal.SIGKILL)
        assert await running.exit_code() == 1
        assert await all_gone([first, second], WITHIN)
        assert "worker 1 exited with -9 (died of SIGKILL): stopping the others" in running.text()


async def test_workers_do_not_outlive_a_parent_killed_without_a_word(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with fleet(tmp_path, sqlite_url) as running:
        pids = await running.serving()
        running.process.send_signal(signal.SIGKILL)
        await running.exit_code()
        assert await all_gone(pids, WITHIN)
        assert running.text().count("SIGTERM received") == 0
        assert running.text().count("the parent's exit received: draining") == 2


async def test_a_worker_that_cannot_start_fails_the_whole_start(tmp_path: Path) -> None:
    never_upgraded = f"sqlite:///{tmp_path / 'empty.db'}"
    async with fleet(tmp_path, never_upgraded) as running:
        assert await running.exit_code() == 1
        log = running.text()
        assert "cannot start: storage.url" in log
        assert "run `proxygate db upgrade`" in log
        assert "worker 0 exited with 1 before it was ready" in log
        assert "worker-1" not in log  # the others were never started
        assert "Traceback" not in log
