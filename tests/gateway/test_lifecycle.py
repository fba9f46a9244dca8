"""Leases come back on every path (client gone mid-dial or mid-body, upstream reset mid-response,
shutdown), and `Gateway.stop()` drains: it stops accepting at once, lets open tunnels finish
within the drain window and cuts the rest."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.app import Gateway
from tests.gateway.conftest import StartGateway, leases_held
from tests.support.fixtures import FakeHttpProxyFactory, FakeSocks5ProxyFactory
from tests.support.net import reset
from tests.support.origin import EchoServer, Origin, trailer
from tests.support.proxying import pool_toml
from tests.support.raw_http import (
    TIMEOUT,
    authority,
    closed_by_peer,
    echo_of,
    raw_connection,
    read_head,
    read_response,
    request,
)
from tests.support.waiting import eventually


async def held(gateway: Gateway, pool: str = "default") -> int:
    """Leases held in `pool`, as the pool's own statistics count them."""
    return (await gateway.storage.stats(pool, 0)).leases_held


async def wait_released(gateway: Gateway, pool: str = "default", timeout: float = TIMEOUT) -> None:
    async def check() -> bool:
        return await held(gateway, pool) == 0 and await leases_held(gateway) == 0

    await eventually(check, f"every lease of pool {pool!r} released", timeout)


async def open_tunnel(
    address: tuple[str, int], target: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel through the gateway, checked with one echo round trip."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request("CONNECT", target, headers=[("Host", target)]))
    assert (await read_head(reader))[1] == 200
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"
    return reader, writer


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


# -- leases on every path -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_gone_while_a_tunnel_is_dialed_releases_the_lease(
    start_gateway: StartGateway,
    echo_server: EchoServer,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    how: str,
) -> None:
    slow = await fake_http_proxy_factory()
    slow.faults.slow = 0.3  # the CONNECT reply comes late
    gateway = await start_gateway(pool_toml(slow.url))
    target = authority(echo_server)
    async with raw_connection(gateway.listen_addresses[0]) as (_, writer):
        writer.write(request("CONNECT", target, headers=[("Host", target)]))

        async def dialing() -> bool:
            return len(slow.requests) == 1 and await held(gateway) == 1

        await eventually(dialing, "the upstream got the CONNECT")
        if how == "reset":
            reset(writer)
    await wait_released(gateway)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_gone_while_a_plain_request_is_dialed_releases_the_lease(
    start_gateway: StartGateway,
    origin: Origin,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
    how: str,
) -> None:
    slow = await fake_socks5_proxy_factory()
    slow.faults.slow = 0.3  # the SOCKS5 method selection comes late
    gateway = await start_gateway(pool_toml(slow.url))
    async with raw_connection(gateway.listen_addresses[0]) as (_, writer):
        writer.write(request("GET", origin.url_for("/echo")))

        async def dialing() -> bool:
            return slow.connections == 1 and await held(gateway) == 1

        await eventually(dialing, "the upstream accepted the dial")
        if how == "reset":
            reset(writer)
    await wait_released(gateway)


async def test_client_gone_during_the_dial_does_not_wait_for_a_slow_origin(
    start_gateway: StartGateway,
    origin: Origin,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    slow = await fake_socks5_proxy_factory()
    slow.faults.slow = 0.3
    gateway = await start_gateway(pool_toml(slow.url))
    try:
        async with raw_connection(gateway.listen_addresses[0]) as (_, writer):
            writer.write(request("GET", origin.url_for("/slow?seconds=30")))

            async def dialing() -> bool:
                return slow.connections == 1 and await held(gateway) == 1

            await eventually(dialing, "the upstream accepted the dial")
        # The client is gone before the dial finished: nobody will read the answer.
        await wait_released(gateway, timeout=1.5)
    finally:
        await gateway.stop(drain_timeout=0.1)  # end the orphaned exchange either way


async def test_client_gone_mid_request_body_releases_the_lease(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway()
    async with raw_connection(gateway.listen_addresses[0]) as (_, writer):
        writer.write(
            request(
                "POST",
                origin.url_for("/upload"),
                headers=[("Host", authority(origin)), ("Content-Length", "1000000")],
                body=b"0123456789",
            )
        )

        async def uploading() -> bool:
            return origin.count("/upload") == 1 and await held(gateway) == 1

        await eventually(uploading, "the origin got the upload's head")
    await wait_released(gateway)
    # The gateway is none the worse for it.
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("GET", origin.url_for("/echo")))
        assert echo_of(await read_response(reader))["path"] == "/echo"


@pytest.mark.parametrize("kind", ["http", "socks5"])
async def test_upstream_reset_mid_response_cuts_the_client_and_releases_the_lease(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
    kind: str,
) -> None:
    factory = fake_http_proxy_factory if kind == "http" else fake_socks5_proxy_factory
    flaky = await factory()
    flaky.faults.reset_after = 20_000
    gateway = await start_gateway(pool_toml(flaky.url, extra="retries = 0"))
    size = 1_000_000
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("GET", origin.url_for(f"/bytes/{size}")))
        _, status, _, headers = await read_head(reader)
        assert status == 200
        assert ("Content-Length", str(size)) in headers
        got = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
                got += len(chunk)
        assert 0 < got < size  # cut off, and never passed off as complete
    await wait_released(gateway)


async def test_upstream_reset_mid_tunnel_resets_the_client_and_releases_the_lease(
    start_gateway: StartGateway,
    echo_server: EchoServer,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    flaky = await fake_socks5_proxy_factory()
    flaky.faults.reset_after = 1000
    gateway = await start_gateway(pool_toml(flaky.url))
    target = authority(echo_server)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(request("CONNECT", target, headers=[("Host", target)]))
        assert (await read_head(reader))[1] == 200
        writer.write(b"x" * 4000)
        got = b""
        with pytest.raises(ConnectionResetError):  # noqa: PT012 - read until the reset
            while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT):
                got += chunk
        assert len(got) < 4000
    await wait_released(gateway)


# -- shutdown -----------------------------------------------------------------------------------


async def test_stop_cancels_open_tunnels_and_requests_and_releases_every_lease(
    start_gateway: StartGateway,
    origin: Origin,
    echo_server: EchoServer,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    socks = await fake_socks5_proxy_factory()
    stuck = await fake_http_proxy_factory()
    stuck.faults.slow = 60  # answers its CONNECT long after the test is over
    gateway = await start_gateway(
        pool_toml(socks.url)
        + pool_toml("direct://", name="out")
        + pool_toml(stuck.url, name="stuck")
    )
    address = gateway.listen_addresses[0]
    target = authority(echo_server)
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # A tunnel, a tunnel in a session, a plain request waiting for its origin, and a tunnel
        # still being dialed.
        clients.append(await open_tunnel(address, target))
        clients.append(await asyncio.open_connection(*address))
        clients[-1][1].write(
            request("CONNECT", target, headers=[("Host", target), ("X-Proxy-Session", "s1")])
        )
        assert (await read_head(clients[-1][0]))[1] == 200
        clients.append(await asyncio.open_connection(*address))
        clients[-1][1].write(
            request("GET", origin.url_for("/slow?seconds=30"), headers=[("X-Proxy-Pool", "out")])
        )
        clients.append(await asyncio.open_connection(*address))
        clients[-1][1].write(
            request("CONNECT", target, headers=[("Host", target), ("X-Proxy-Pool", "stuck")])
        )

        async def all_busy() -> bool:
            return (
                origin.count("/slow") == 1
                and len(stuck.requests) == 1
                and await held(gateway, "out") == 1
                and await held(gateway, "stuck") == 1
            )

        await eventually(all_busy, "the slow request and the stuck dial under way")
        await asyncio.wait_for(gateway.stop(drain_timeout=0.2), TIMEOUT)
        for reader, _ in clients:
            assert await closed_by_peer(reader)
        # Every lease is back, the session's own lease included: a stopped gateway holds none.
        assert await leases_held(gateway, sessions=True) == 0
        for pool in ("out", "stuck"):
            assert await held(gateway, pool) == 0
    finally:
        for _, writer in clients:
            await close(writer)


async def test_stop_refuses_new_connections_at_once_and_lets_an_open_tunnel_finish(
    start_gateway: StartGateway, echo_server: EchoServer
) -> None:
    gateway = await start_gateway()
    address = gateway.listen_addresses[0]
    reader, writer = await open_tunnel(address, authority(echo_server))
    try:
        stopping = asyncio.create_task(gateway.stop(drain_timeout=60))
        await asyncio.sleep(0)  # stop() runs up to its first wait: the listeners are closed
        with pytest.raises(ConnectionRefusedError):
            await close((await asyncio.open_connection(*address))[1])
        assert not stopping.done()
        # The tunnel opened before the stop still carries bytes both ways ...
        writer.write(b"more")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"more"
        assert await held(gateway) == 1
        # ... and when it ends by itself, stop() returns without waiting out the drain window.
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == trailer(8)
        await asyncio.wait_for(stopping, TIMEOUT)
        assert await held(gateway) == 0
    finally:
        await close(writer)


async def test_stop_with_a_short_drain_cuts_a_still_open_tunnel(
    start_gateway: StartGateway, echo_server: EchoServer
) -> None:
    gateway = await start_gateway()
    reader, writer = await open_tunnel(gateway.listen_addresses[0], authority(echo_server))
    try:
        stopping = asyncio.create_task(gateway.stop(drain_timeout=0.2))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # still draining: the tunnel works
        writer.write(b"pong")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"pong"
        await asyncio.wait_for(stopping, TIMEOUT)
        assert await closed_by_peer(reader)
        assert await held(gateway) == 0
    finally:
        await close(writer)


async def test_stop_does_not_wait_for_idle_keep_alive_connections(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await start_gateway()
    reader, writer = await asyncio.open_connection(*gateway.listen_addresses[0])
    writer.write(request("GET", origin.url_for("/echo")))
    assert echo_of(await read_response(reader))["path"] == "/echo"
    # The response is complete; the connection idles between requests.
    stopping = asyncio.create_task(gateway.stop(drain_timeout=30))
    try:
        await asyncio.wait_for(asyncio.shield(stopping), 5.0)  # far below the drain window
        assert await closed_by_peer(reader)
    finally:
        await close(writer)  # the client leaves, so the stop ends either way
        await asyncio.wait_for(stopping, TIMEOUT)


async def test_stop_with_a_zero_drain_cuts_open_tunnels_at_once(
    start_gateway: StartGateway, echo_server: EchoServer
) -> None:
    gateway = await start_gateway()
    reader, writer = await open_tunnel(gateway.listen_addresses[0], authority(echo_server))
    stopping = asyncio.create_task(gateway.stop(drain_timeout=0))
    try:
        await asyncio.wait_for(asyncio.shield(stopping), 5.0)  # far below the drain window
        assert await closed_by_peer(reader)
    finally:
        await close(writer)  # the tunnel ends, so the stop does too
        await asyncio.wait_for(stopping, TIMEOUT)
