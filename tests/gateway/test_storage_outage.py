"""The storage going away under a running gateway: clients of every protocol are refused at once
with a 503 (SOCKS: general failure) that says so, open tunnels carry on, nothing crashes, and the
gateway serves again by itself once the storage answers, with every lease given back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from config import load_settings
from core.checks import CheckScheduler
from core.leasing import LeaseManager
from core.storage.memory import MemoryStorage
from gateway.app import Gateway
from tests.gateway.conftest import leases_held
from tests.gateway.outage import STORAGE_DOWN, answers, echoes, open_tunnel, serves_again
from tests.storage.flaky import FlakyStorage, flaky
from tests.support.fixtures import FakeHttpProxyFactory
from tests.support.origin import EchoServer, Origin
from tests.support.proxying import pool_toml
from tests.support.waiting import eventually


@pytest.fixture
async def gateway_and_switch(
    tmp_path: Path, fake_http_proxy_factory: FakeHttpProxyFactory
) -> AsyncIterator[tuple[Gateway, FlakyStorage, MemoryStorage]]:
    upstreams = [await fake_http_proxy_factory() for _ in range(2)]
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[gateway]\nlisten = ["127.0.0.1:0"]\nacquire_timeout = 5.0\n'
        '[admin]\nlisten = ""\n[checks]\nenabled = false\n'
        + pool_toml(*(u.url for u in upstreams), extra="max_concurrency = 1")
    )
    memory = MemoryStorage()
    storage, switch = flaky(memory)
    gateway = Gateway(load_settings(path, env={}), storage=storage)
    await gateway.start()
    try:
        yield gateway, switch, memory
    finally:
        switch.down = False
        await gateway.stop(drain_timeout=1.0)


async def test_clients_get_503_storage_unavailable_and_the_gateway_recovers_by_itself(
    gateway_and_switch: tuple[Gateway, FlakyStorage, MemoryStorage],
    origin: Origin,
    echo_server: EchoServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway, switch, memory = gateway_and_switch
    proxy = gateway.listen_addresses[0]
    before = await answers(proxy, origin, echo_server)
    assert (before.http[0], before.connect[0], before.socks5, before.socks4) == (200, 200, 0, 0)

    with caplog.at_level(logging.INFO):
        async with open_tunnel(proxy, echo_server) as (reader, writer):
            switch.down = True
            down = await answers(proxy, origin, echo_server)
            assert down.http == (503, STORAGE_DOWN)
            assert down.connect == (503, STORAGE_DOWN)
            assert down.socks5 == 0x01  # general SOCKS server failure
            assert down.socks4 == 0x5B  # request rejected or failed
            # A tunnel leased before the outage needs no storage to carry on.
            assert await echoes(reader, writer)
        # ...and ends without it: its release waits for the storage.
        await eventually(
            lambda: _true(switch.refused.get("release", 0) == 1), "the tunnel's release refused"
        )
        assert (await memory.stats("default", 0)).leases_held == 1

        switch.down = False
        await serves_again(proxy, origin, within=10.0)
        after = await answers(proxy, origin, echo_server)
        assert (after.http[0], after.connect[0], after.socks5, after.socks4) == (200, 200, 0, 0)
        # The kept release is written by the next sweep (one a second).
        await eventually(lambda: _none_held(gateway), "the kept release written", 10.0)
    assert (await memory.stats("default", 0)).leases_held == 0
    assert gateway.manager.double_releases == 0
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("storage unavailable") for m in messages)
    assert any(m.startswith("storage answers again") for m in messages)


async def _true(value: bool) -> bool:
    return value


async def _none_held(gateway: Gateway) -> bool:
    return await leases_held(gateway) == 0


async def test_the_admin_api_answers_503_while_the_storage_is_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[gateway]\nlisten = ["127.0.0.1:0"]\n[admin]\nlisten = "127.0.0.1:0"\n'
        "[checks]\nenabled = false\n" + pool_toml("direct://")
    )
    storage, switch = flaky(MemoryStorage())
    gateway = Gateway(load_settings(path, env={}), storage=storage)
    await gateway.start()
    assert gateway.admin_address is not None
    url = "http://{}:{}/api/stats".format(*gateway.admin_address)
    try:
        async with aiohttp.ClientSession() as session:
            switch.down = True
            async with session.get(url) as response:
                assert response.status == 503
                assert await response.json() == {"error": "storage unavailable"}
            switch.down = False
            async with session.get(url) as response:
                assert response.status == 200
    finally:
        switch.down = False
        await gateway.stop(drain_timeout=1.0)
    assert "Traceback" not in caplog.text


async def test_check_rounds_skipped_for_want_of_storage_say_so_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage, switch = flaky(MemoryStorage())
    switch.down = True
    manager = LeaseManager(storage)
    scheduler = CheckScheduler(manager, [], tick=0.01)
    with caplog.at_level(logging.WARNING):
        await scheduler.start()
        try:
            await eventually(
                lambda: _true("health check round skipped" in caplog.text), "a skipped round"
            )
        finally:
            await scheduler.close()
    assert "Traceback" not in caplog.text
