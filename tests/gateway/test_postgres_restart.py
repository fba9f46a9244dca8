"""A gateway on PostgreSQL whose server restarts under it (a private server, stopped and started
mid-test): while it is down clients get 503 storage unavailable (SOCKS5: general failure) at
once, a tunnel leased before goes on, and within seconds of its return the gateway serves
again, with every lease accounted for exactly once: the tunnel's, given back during the outage,
is released; the session's survives and is used again; none is duplicated."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from config import load_settings
from gateway.app import Gateway
from tests.gateway.outage import STORAGE_DOWN, answers, echoes, open_tunnel, serves_again
from tests.storage.private_postgres import PrivatePostgres, upgraded_private_postgres
from tests.support.fixtures import FakeHttpProxyFactory
from tests.support.origin import EchoServer, Origin
from tests.support.proxying import fetch, pool_toml
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow


@pytest.fixture
async def postgres() -> AsyncIterator[PrivatePostgres]:
    async with upgraded_private_postgres() as server:
        yield server


async def books(url: str) -> dict[str, tuple[int, int]]:
    """Per upstream: the leases the storage counts as active, and the lease rows it holds."""
    connection = await asyncpg.connect(url, timeout=5)
    try:
        rows = await connection.fetch(
            "SELECT u.id, u.active, count(l.id) AS held FROM upstreams u "
            "LEFT JOIN leases l ON l.upstream_key = u.key GROUP BY u.key, u.id, u.active"
        )
    finally:
        await connection.close()
    return {row["id"]: (row["active"], row["held"]) for row in rows}


async def session_leases(url: str) -> list[tuple[str, int]]:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        rows = await connection.fetch("SELECT session, uses FROM leases ORDER BY id")
    finally:
        await connection.close()
    return [(row["session"], row["uses"]) for row in rows]


async def test_a_postgresql_restart_costs_503s_while_down_and_no_lease(
    postgres: PrivatePostgres,
    tmp_path: Path,
    origin: Origin,
    echo_server: EchoServer,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstreams = [await fake_http_proxy_factory() for _ in range(2)]
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[gateway]\nlisten = ["127.0.0.1:0"]\n[checks]\nenabled = false\n'
        f'[admin]\nlisten = "127.0.0.1:0"\n[storage]\nurl = "{postgres.url}"\n'
        + pool_toml(*(u.url for u in upstreams), extra="max_concurrency = 4")
    )
    gateway = Gateway(load_settings(path, env={}))
    await gateway.start()
    proxy = gateway.listen_addresses[0]
    admin = "http://{}:{}/api/stats".format(*gateway.admin_address or ("", 0))
    sticky = {"X-Proxy-Session": "s1"}
    try:
        with caplog.at_level(logging.INFO):
            assert (await answers(proxy, origin, echo_server)).http[0] == 200
            status, _, _ = await fetch(origin.url_for("/echo"), _url(proxy), headers=sticky)
            assert status == 200
            async with open_tunnel(proxy, echo_server) as (reader, writer):
                await postgres.stop()
                down = await answers(proxy, origin, echo_server)
                assert down.http == (503, STORAGE_DOWN)
                assert down.connect == (503, STORAGE_DOWN)
                assert (down.socks5, down.socks4) == (0x01, 0x5B)
                assert await echoes(reader, writer)  # the tunnel needs no storage
            await postgres.start()
            await serves_again(proxy, origin, within=15.0)

        # The tunnel's release, kept during the outage, is written by a sweep; then only the
        # session's lease is left, counted once.
        async def only_the_session_is_held() -> bool:
            return await session_leases(postgres.url) == [("s1", 1)]

        await eventually(only_the_session_is_held, "the tunnel's lease released", 10.0)
        status, _, _ = await fetch(origin.url_for("/echo"), _url(proxy), headers=sticky)
        assert status == 200
        assert await session_leases(postgres.url) == [("s1", 2)]  # the same lease, used again
        counted = await books(postgres.url)
        assert sorted(counted.values()) == [(0, 0), (1, 1)]
        async with aiohttp.ClientSession() as client, client.get(admin) as response:
            stats = (await response.json())["pools"]["default"]
        assert (stats["leases_held"], stats["leased"]) == (1, 1)
        assert gateway.manager.double_releases == 0
        assert "Traceback" not in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await gateway.stop(drain_timeout=1.0)
    assert await session_leases(postgres.url) == []  # stopping gives the session back
    assert sorted((await books(postgres.url)).values()) == [(0, 0), (0, 0)]


def _url(proxy: tuple[str, int]) -> str:
    return f"http://{proxy[0]}:{proxy[1]}"
