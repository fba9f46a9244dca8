"""Kept upstream connections: plain HTTP requests reuse them, by the rules of a good pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict

import aiohttp
import pytest

from core.models import Upstream
from gateway.app import Gateway
from loadtest.fleet import SimUpstream
from tests.gateway.conftest import StartGateway, proxy_url
from tests.support.fixtures import FakeHttpProxyFactory
from tests.support.net import TcpServer
from tests.support.origin import Origin
from tests.support.proxying import fetch, pool_toml

LISTEN = '[gateway]\nlisten = ["127.0.0.1:0"]\n'


def stats(gateway: Gateway) -> dict[str, int]:
    return asdict(gateway.context.connections.stats)


async def get_all(gateway: Gateway, url: str, n: int) -> list[int]:
    return [(await fetch(f"{url}?i={i}", proxy_url(gateway)))[0] for i in range(n)]


class KeepAliveOrigin(TcpServer):
    """Answers every request with a small keep-alive response, and misbehaves on demand:
    `close_idle_after` closes a connection that long after each answer; `drop_second` reads the
    second request on a connection and closes without answering (a close racing a request)."""

    def __init__(self, *, close_idle_after: float | None = None, drop_second: bool = False):
        super().__init__()
        self.close_idle_after = close_idle_after
        self.drop_second = drop_second
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            self.requests += 1
            if self.drop_second and served == 1:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()
            served += 1
            if self.close_idle_after is not None:
                await asyncio.sleep(self.close_idle_after)
                return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture
async def sim_upstreams() -> AsyncIterator[list[SimUpstream]]:
    upstreams = [SimUpstream(index, "http") for index in (40, 41)]
    for upstream in upstreams:
        await upstream.start()
    yield upstreams
    for upstream in upstreams:
        await upstream.stop()


async def test_rotating_requests_reuse_one_connection_per_http_upstream(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await start_gateway(pool_toml(*(u.url for u in sim_upstreams)))
    statuses = await get_all(gateway, origin.url_for("/echo"), 20)
    assert statuses == [200] * 20
    assert [u.requests for u in sim_upstreams] == [10, 10]  # still rotating per request
    assert [u.accepted for u in sim_upstreams] == [1, 1]
    # Each request counts once, though the first on each upstream looked twice (the lane,
    # then the coroutine that dialed).
    assert (stats(gateway)["reused"], stats(gateway)["missed"]) == (18, 2)
    assert origin.count("/echo") == 20


async def test_direct_requests_reuse_one_connection_to_the_target(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway(pool_toml("direct://"))
    assert await get_all(gateway, origin.url_for("/echo"), 10) == [200] * 10
    assert len(origin.connections) == 1


async def test_a_connection_retires_after_max_uses(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway(LISTEN + "keepalive_max_uses = 3\n" + pool_toml("direct://"))
    assert await get_all(gateway, origin.url_for("/echo"), 10) == [200] * 10
    assert len(origin.connections) == 4
    assert stats(gateway)["retired"] == 3


async def test_reuse_off_opens_a_connection_per_request_and_says_so(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway(LISTEN + "keepalive_max_idle = 0\n" + pool_toml("direct://"))
    assert await get_all(gateway, origin.url_for("/echo"), 5) == [200] * 5
    assert len(origin.connections) == 5
    for request in origin.requests:
        assert ("Connection", "close") in request.headers
    assert stats(gateway)["kept"] == 0


async def test_an_idle_connection_expires(start_gateway: StartGateway, origin: Origin) -> None:
    gateway = await start_gateway(
        LISTEN + "keepalive_idle_timeout = 0.2\n" + pool_toml("direct://")
    )
    assert (await fetch(origin.url_for("/echo"), proxy_url(gateway)))[0] == 200
    await asyncio.sleep(0.5)
    assert (await fetch(origin.url_for("/echo"), proxy_url(gateway)))[0] == 200
    assert len(origin.connections) == 2
    assert stats(gateway)["expired"] == 1


async def test_a_connection_closed_while_idle_is_never_lent(start_gateway: StartGateway) -> None:
    async with KeepAliveOrigin(close_idle_after=0.05) as target:
        gateway = await start_gateway(pool_toml("direct://"))
        assert (await fetch(target.url, proxy_url(gateway)))[0] == 200
        for _ in range(100):  # until the gateway has seen the close
            if stats(gateway)["closed_by_upstream"]:
                break
            await asyncio.sleep(0.02)
        assert (await fetch(target.url, proxy_url(gateway)))[0] == 200
        assert stats(gateway)["closed_by_upstream"] == 1
        assert stats(gateway)["reused"] == 0
        assert len(target.accepted) == 2


async def test_a_kept_connection_closing_as_the_request_goes_out_is_retried_fresh(
    start_gateway: StartGateway,
) -> None:
    async with KeepAliveOrigin(drop_second=True) as target:
        gateway = await start_gateway(pool_toml("direct://"))
        assert (await fetch(target.url, proxy_url(gateway)))[0] == 200
        status, _, body = await fetch(target.url, proxy_url(gateway))
        assert (status, body) == (200, b"ok\n")
        assert (target.requests, len(target.accepted)) == (3, 2)
        # The upstream did nothing wrong: its health heard no failure.
        upstream_id = Upstream.from_url("direct://", "default").id
        history = await gateway.storage.history(upstream_id)
        assert [record.outcome.value for record in history if record.outcome.value != "ok"] == []


async def test_a_request_with_a_body_never_rides_a_kept_connection(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway(pool_toml("direct://"))
    assert (await fetch(origin.url_for("/echo"), proxy_url(gateway)))[0] == 200
    status, _, _ = await fetch(
        origin.url_for("/upload"), proxy_url(gateway), method="POST", data=b"x" * 100
    )
    assert status == 200
    assert len(origin.connections) == 2
    # The POST's connection is kept afterwards all the same, for the next GET.
    assert (await fetch(origin.url_for("/echo"), proxy_url(gateway)))[0] == 200
    assert len(origin.connections) == 2


async def test_a_response_that_closes_its_connection_is_not_kept(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxy = await fake_http_proxy_factory()  # answers with Connection: close
    gateway = await start_gateway(pool_toml(proxy.url))
    assert await get_all(gateway, origin.url_for("/echo"), 3) == [200] * 3
    assert proxy.connections == 3
    assert stats(gateway)["kept"] == 0


async def test_stopping_the_gateway_closes_kept_connections(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await start_gateway(pool_toml(*(u.url for u in sim_upstreams)))
    assert await get_all(gateway, origin.url_for("/echo"), 4) == [200] * 4
    assert stats(gateway)["idle"] == 2
    gateway.context.begin_drain()
    assert stats(gateway)["idle"] == 0
    for _ in range(100):
        if not any(u.live for u in sim_upstreams):
            break
        await asyncio.sleep(0.02)
    assert not any(u.live for u in sim_upstreams)


async def test_the_admin_api_reports_kept_connections(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway(pool_toml("direct://"))
    assert await get_all(gateway, origin.url_for("/echo"), 3) == [200] * 3
    assert gateway.admin_address is not None
    host, port = gateway.admin_address
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}/api/stats") as response,
    ):
        body = await response.json()
    assert body["upstream_connections"] == stats(gateway)
    assert (body["upstream_connections"]["reused"], body["upstream_connections"]["idle"]) == (2, 1)
    assert body["retry_budget"] == {"peak": 0, "denied": 0}
    assert body["tasks"] >= 1  # this process's asyncio tasks, the admin request's among them


class StallingOrigin(TcpServer):
    """Sends a response head and part of its body, then nothing, ever."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await reader.read()


async def test_a_response_stalling_mid_body_ends_after_idle_timeout(
    start_gateway: StartGateway,
) -> None:
    async with StallingOrigin() as target:
        gateway = await start_gateway(LISTEN + "idle_timeout = 0.4\n" + pool_toml("direct://"))
        reader, writer = await asyncio.open_connection(*gateway.listen_addresses[0])
        writer.write(f"GET http://127.0.0.1:{target.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionResetError):
                while chunk := await reader.read(1024):
                    received += chunk
        writer.close()
        assert received.startswith(b"HTTP/1.1 200 ")
        assert received.endswith(b"\r\n\r\nabc")  # cut short, never passed off as whole
        assert stats(gateway)["kept"] == 0


async def test_kept_connections_stay_within_their_total_bound(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    # Eight upstreams to the gateway (user names tell them apart), two servers in truth.
    urls = [f"http://u{i}:x@{u.host}:{u.port}" for i in range(4) for u in sim_upstreams]
    gateway = await start_gateway(LISTEN + "keepalive_max_idle_total = 3\n" + pool_toml(*urls))
    assert await get_all(gateway, origin.url_for("/echo"), 16) == [200] * 16
    counts = stats(gateway)
    # Rotation over more upstreams than the bound: each kept connection made room for the
    # next and was gone before its upstream came round again.
    assert (counts["idle"], counts["evicted"], counts["reused"]) == (3, 13, 0)
    for _ in range(100):  # the upstreams hear the evicted ones close a moment later
        if sum(len(u.live) for u in sim_upstreams) == 3:
            break
        await asyncio.sleep(0.02)
    assert sum(len(u.live) for u in sim_upstreams) == 3


async def test_kept_connections_stay_within_their_bound_per_upstream(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway(LISTEN + "keepalive_max_idle = 1\n" + pool_toml("direct://"))
    # Three at once need three connections; afterwards one is kept, the others make way.
    results = await asyncio.gather(
        *(fetch(origin.url_for(f"/slow?seconds=0.2&i={i}"), proxy_url(gateway)) for i in range(3))
    )
    assert [status for status, _, _ in results] == [200] * 3
    counts = stats(gateway)
    assert (counts["idle"], counts["kept"], counts["evicted"]) == (1, 3, 2)
