"""Failed dials whose lease goes back to PostgreSQL, in `proxygate run --workers 2`: the
reproduction of the compiled build's crash.

Giving back and reporting a failed dial's lease wait for PostgreSQL, so the coroutine that
handles the failure is suspended there while other tasks run. Compiled with mypyc, a coroutine
suspended inside an `except` block resumed with whatever exception another task was handling,
or none: its bare `raise` then raised None, which corrupted memory and killed the worker with
SIGSEGV within seconds of the first failed attempt (3 runs in 7), or left a task that never
finished. With memory storage nothing there waits, so only SQL storage showed it. The rule
that prevents it is checked over every compiled module in tests/test_compiled.py; this is the
whole scenario, through real processes and sockets.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from tests.support.fake_upstreams import FakeSocks5Proxy
from tests.support.net import closed_port
from tests.support.origin import Origin
from tests.support.processes import WITHIN, Ports, all_gone, gateway_env, proxygate_run

#: Keep-alive clients at once, and requests each sends.
CLIENTS = 4
REQUESTS = 15


def config(storage_url: str, proxies: list[str], ports: Ports) -> str:
    listed = ", ".join(f'"{proxy}"' for proxy in proxies)
    return (
        f'[gateway]\nlisten = ["127.0.0.1:{ports.proxy}"]\nconnect_timeout = 2.0\n'
        # Every failed attempt is retried (no retry budget to run out of), so every request
        # must end in 200: anything else is the gateway failing, not its policy.
        "retry_budget_percent = 100.0\nretry_budget_min = 1000\n"
        f'drain_timeout = 5.0\n[admin]\nlisten = "127.0.0.1:{ports.admin}"\n'
        f'[checks]\nenabled = false\n[storage]\nurl = "{storage_url}"\n'
        f'[[pools]]\nname = "default"\nproxies = [{listed}]\nretries = 3\n'
    )


async def keep_alive_client(proxy_url: str, origin: Origin) -> list[int]:
    """REQUESTS GETs over one kept client connection; their statuses."""
    connector = aiohttp.TCPConnector(limit=1)
    statuses = []
    async with aiohttp.ClientSession(connector=connector) as client:
        for _ in range(REQUESTS):
            async with client.get(origin.url_for("/bytes/16"), proxy=proxy_url) as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def test_failed_dials_over_postgresql_crash_no_worker(
    tmp_path: Path, postgres_schema_url: str, origin: Origin, fake_socks5_proxy: FakeSocks5Proxy
) -> None:
    # Round robin over a live upstream and two where nothing listens: about two first
    # attempts in three fail (until the dead ones are ejected), and are retried on the live one.
    proxies = [fake_socks5_proxy.url, *(f"socks5://127.0.0.1:{closed_port()}" for _ in "ab")]
    ports = Ports.free()
    async with proxygate_run(
        tmp_path,
        config(postgres_schema_url, proxies, ports),
        *("--workers", "2"),
        env=gateway_env(PYTHONFAULTHANDLER="1"),  # a crash says where it happened
    ) as gateway:
        pids = await gateway.workers_serving()
        proxy_url = f"http://127.0.0.1:{ports.proxy}"
        clients = (keep_alive_client(proxy_url, origin) for _ in range(CLIENTS))
        results = await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 60)
        log = gateway.text()
        assert results == [[200] * REQUESTS] * CLIENTS, log
        assert "failed: connect_refused" in log  # the failure path ran
        gateway.process.send_signal(signal.SIGTERM)
        assert await gateway.exit_code() == 0, log
        assert await all_gone(pids, WITHIN)
        log = gateway.text()
        for sign in ("Fatal Python error", "exited with", "Traceback", "Exception in callback"):
            assert sign not in log, log
