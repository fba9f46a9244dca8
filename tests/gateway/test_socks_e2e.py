"""End to end over real sockets: SOCKS clients -> gateway -> upstreams -> echo server / origin."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from tests.gateway.conftest import StartGateway, proxy_url
from tests.support.fixtures import DebianProxyFactory, FakeSocks5ProxyFactory
from tests.support.net import closed_port
from tests.support.origin import EchoServer, Origin, trailer
from tests.support.proxying import pool_toml


async def open_via(
    url: str, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await Proxy.from_url(url, rdns=True).connect(host, port, timeout=5)
    return await asyncio.open_connection(sock=sock)


async def echo_round_trip(url: str, echo: EchoServer) -> bytes:
    host, port = echo.address
    reader, writer = await open_via(url, host, port)
    writer.write(b"ping")
    writer.write_eof()  # half-close: the echo server answers with a trailer after our EOF
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return data


@pytest.mark.parametrize("scheme", ["socks5", "socks4"])
async def test_socks_clients_tunnel_with_half_close(
    start_gateway: StartGateway,
    echo_server: EchoServer,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
    scheme: str,
) -> None:
    upstream = await fake_socks5_proxy_factory()
    gateway = await start_gateway(pool_toml(upstream.url))
    assert await echo_round_trip(proxy_url(gateway, scheme), echo_server) == b"ping" + trailer(4)
    assert echo_server.peers[-1] == upstream.egress


async def test_socks5_username_routes_pools_and_sessions(
    start_gateway: StartGateway,
    origin: Origin,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    a = [await fake_socks5_proxy_factory() for _ in range(2)]
    b = await fake_socks5_proxy_factory()
    gateway = await start_gateway(
        pool_toml(*(u.url for u in a), name="pa") + pool_toml(b.url, name="pb"),
        gateway__default_pool="pa",
    )

    async def peer(auth: str) -> str:
        host, port = origin.url[len("http://") :].rsplit(":", 1)
        reader, writer = await open_via(proxy_url(gateway, "socks5", auth), host, int(port))
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = (await reader.read()).split(b"\r\n\r\n", 1)[1]
        writer.close()
        await writer.wait_closed()
        return str(json.loads(body)["peer"])

    assert await peer("bob-pool-pb:x@") == b.egress
    assert len({await peer("bob-session-s9:x@") for _ in range(3)}) == 1
    assert len({await peer("bob:x@") for _ in range(2)}) == 2


async def test_socks5_failures_get_exact_reply_codes(
    start_gateway: StartGateway, echo_server: EchoServer
) -> None:
    dead = f"socks5://127.0.0.1:{closed_port()}"
    gateway = await start_gateway(
        pool_toml(dead, extra="retries = 0")
        + pool_toml("direct://", name="open")
        + '[gateway]\nlisten = ["127.0.0.1:0"]\ndeny_destinations = ["127.0.0.99/32"]\n'
    )
    host, port = echo_server.address
    cases = [
        ("socks5://u-pool-nowhere:x@", host, port, 0x02),  # unknown pool
        ("socks5://", host, port, 0x05),  # the only upstream refuses
        ("socks5://u-pool-open:x@", "127.0.0.99", port, 0x02),  # denied by policy
    ]
    for prefix, target, target_port, code in cases:
        gw_host, gw_port = gateway.listen_addresses[0]
        with pytest.raises(ProxyError) as caught:
            await Proxy.from_url(f"{prefix}{gw_host}:{gw_port}").connect(
                target, target_port, timeout=5
            )
        assert caught.value.error_code == code, prefix


async def test_socks5_auth_is_enforced(
    start_gateway: StartGateway, echo_server: EchoServer
) -> None:
    gateway = await start_gateway('[gateway]\nlisten = ["127.0.0.1:0"]\nusers = { alice = "pw" }\n')
    with pytest.raises(ProxyError):
        await echo_round_trip(proxy_url(gateway, "socks5", "alice:nope@"), echo_server)
    with pytest.raises(ProxyError):
        await echo_round_trip(proxy_url(gateway, "socks5"), echo_server)
    data = await echo_round_trip(proxy_url(gateway, "socks5", "alice-session-a:pw@"), echo_server)
    assert data == b"ping" + trailer(4)


async def test_socks4_is_refused_when_auth_is_required(
    start_gateway: StartGateway, echo_server: EchoServer
) -> None:
    gateway = await start_gateway('[gateway]\nlisten = ["127.0.0.1:0"]\nusers = { alice = "pw" }\n')
    host, port = gateway.listen_addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    target = socket.inet_aton(echo_server.address[0])
    writer.write(struct.pack("!BBH", 4, 1, echo_server.address[1]) + target + b"alice\x00")
    reply = await reader.readexactly(8)
    assert reply[1] == 0x5B
    writer.close()
    await writer.wait_closed()


async def test_through_debian_microsocks_and_tinyproxy(
    start_gateway: StartGateway,
    origin: Origin,
    microsocks_factory: DebianProxyFactory,
    tinyproxy_factory: DebianProxyFactory,
) -> None:
    socks = await microsocks_factory(auth=("user", "pa:ss"))
    http = await tinyproxy_factory()
    gateway = await start_gateway(pool_toml(socks.url, http.url))
    import aiohttp

    peers = set()
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.get(origin.url_for("/echo"), proxy=proxy_url(gateway)) as r:
                assert r.status == 200
                peers.add(json.loads(await r.read())["peer"])
    assert peers == {socks.egress, http.egress}


async def socks5_reply_code(gateway_url: str, host: str, port: int) -> int:
    with pytest.raises(ProxyError) as caught:
        await Proxy.from_url(gateway_url).connect(host, port, timeout=5)
    return int(caught.value.error_code or -1)


async def test_socks5_reply_codes_for_busy_unreachable_and_timeout(
    start_gateway: StartGateway,
    echo_server: EchoServer,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    network, host_down, hole = [await fake_socks5_proxy_factory() for _ in range(3)]
    network.faults.reply_code = 0x03
    host_down.faults.reply_code = 0x04
    hole.faults.blackhole = True
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\nconnect_timeout = 0.3\nacquire_timeout = 0.2\n'
        'default_pool = "busy"\n'
        + pool_toml(network.url, name="net", extra="retries = 0")
        + pool_toml(host_down.url, name="host", extra="retries = 0")
        + pool_toml(hole.url, name="hole", extra="retries = 0")
        + pool_toml("direct://", name="busy", extra="max_concurrency = 1")
    )
    target_host, target_port = echo_server.address
    gw_host, gw_port = gateway.listen_addresses[0]

    def url(pool: str) -> str:
        return f"socks5://u-pool-{pool}:x@{gw_host}:{gw_port}"

    assert await socks5_reply_code(url("net"), target_host, target_port) == 0x03
    assert await socks5_reply_code(url("host"), target_host, target_port) == 0x04
    assert await socks5_reply_code(url("hole"), target_host, target_port) == 0x06
    _, writer = await open_via(url("busy"), target_host, target_port)  # holds the only slot
    assert await socks5_reply_code(url("busy"), target_host, target_port) == 0x01
    writer.close()
    await writer.wait_closed()
