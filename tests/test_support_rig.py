"""The real-socket rig works: origin, echo server, fake upstreams, faults, Debian proxies."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from tests.support.debian_proxies import RunningProxy
from tests.support.fake_upstreams import FakeHttpProxy, FakeSocks5Proxy, SocksReply, closed_port
from tests.support.fixtures import *  # noqa: F403
from tests.support.fixtures import (
    DebianProxyFactory,
    FakeHttpProxyFactory,
    FakeSocks5ProxyFactory,
)
from tests.support.net import close_writer
from tests.support.origin import (
    EchoServer,
    Origin,
    TlsMaterial,
    make_tls_material,
    pattern,
    pattern_sha256,
    trailer,
)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def through(
    proxy_url: str,
    host: str,
    port: int,
    *,
    rdns: bool | None = None,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Streams]:
    """A stream to host:port tunnelled through `proxy_url` (python-socks), closed afterwards."""
    sock = await Proxy.from_url(proxy_url, rdns=rdns).connect(host, port, timeout=5)
    try:
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=tls, server_hostname=host if tls else None
        )
    except BaseException:
        sock.close()
        raise
    try:
        yield reader, writer
    finally:
        await close_writer(writer)


@contextlib.asynccontextmanager
async def connected(host: str, port: int) -> AsyncIterator[Streams]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        await close_writer(writer)


async def http_get(streams: Streams, host: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET with Connection: close over `streams`; reads to EOF."""
    reader, writer = streams
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def echo_round_trip(streams: Streams, payload: bytes) -> bytes:
    """Send `payload`, half-close, and read everything the far side sends until EOF."""
    reader, writer = streams
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    return await asyncio.wait_for(reader.read(), 5)


async def echo_without_half_close(streams: Streams, payload: bytes) -> None:
    """Round trip through a proxy that ends the whole connection on the client's EOF.

    microsocks and tinyproxy do not relay a half-close: after the client's EOF the tunnel is
    closed both ways, so the echo server's trailer never arrives.
    """
    reader, writer = streams
    writer.write(payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) in (b"", trailer(len(payload)))


async def get_json(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with session.get(url, **kwargs) as response:
        return response.status, json.loads(await response.read())


def header_names(echo: dict[str, Any]) -> list[str]:
    return [name.lower() for name, _ in echo["headers"]]


# -- origin and echo server ------------------------------------------------------------------


async def test_origin_routes(origin: Origin) -> None:
    async with aiohttp.ClientSession() as session:
        status, echo = await get_json(session, origin.url_for("/echo?a=1"), headers={"X-A": "1"})
        assert status == 200
        assert echo["peer"] == "127.0.0.1"
        assert echo["path"] == "/echo?a=1"
        assert ["X-A", "1"] in echo["headers"]
        assert echo["body_length"] == 0

        async with session.head(origin.url_for("/echo")) as response:
            assert response.status == 200
            assert await response.read() == b""

        async with session.get(origin.url_for("/bytes/200000")) as response:
            body = await response.read()
            assert response.headers["Content-Length"] == "200000"
        assert body == pattern(200000)
        assert hashlib.sha256(body).hexdigest() == response.headers["X-Body-Sha256"]
        assert pattern(1000) == body[:1000]

        async with session.get(origin.url_for("/bytes/70000?chunked=1")) as response:
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in response.headers
            assert hashlib.sha256(await response.read()).hexdigest() == pattern_sha256(70000)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"x" * 1000

        async with session.post(origin.url_for("/upload"), data=chunks()) as response:
            uploaded = await response.json()
        assert uploaded == {"sha256": hashlib.sha256(b"x" * 3000).hexdigest(), "length": 3000}

        async with session.get(origin.url_for("/status/503")) as response:
            assert response.status == 503
        with pytest.raises(TimeoutError):
            async with session.get(
                origin.url_for("/slow?seconds=5"), timeout=aiohttp.ClientTimeout(total=0.2)
            ):
                pass

    assert origin.count("/upload", "POST") == 1
    assert origin.count("/echo") == 2
    assert origin.count("/slow") == 1


async def test_echo_server_half_close(echo_server: EchoServer) -> None:
    async with connected(*echo_server.address) as streams:
        assert await echo_round_trip(streams, b"hello") == b"hello" + trailer(5)
    assert echo_server.peers == ["127.0.0.1"]


async def test_tls_origin_direct(tls_origin: Origin, tls_material: TlsMaterial) -> None:
    async with aiohttp.ClientSession() as session:
        status, echo = await get_json(
            session, tls_origin.url_for("/echo"), ssl=tls_material.client_context()
        )
    assert (status, echo["peer"]) == (200, "127.0.0.1")


async def test_openssl_tls_fallback(tmp_path: Path) -> None:
    material = make_tls_material(tmp_path, use_trustme=False)
    assert material.generator == "openssl"
    async with (
        Origin(ssl_context=material.server_context()) as server,
        aiohttp.ClientSession() as s,
    ):
        status, _ = await get_json(s, server.url_for("/echo"), ssl=material.client_context())
    assert status == 200


# -- fake HTTP proxy -------------------------------------------------------------------------


async def test_fake_http_connect_tunnel(
    fake_http_proxy: FakeHttpProxy, echo_server: EchoServer
) -> None:
    async with through(fake_http_proxy.url, *echo_server.address) as streams:
        assert await echo_round_trip(streams, b"abc" * 1000) == b"abc" * 1000 + trailer(3000)
    assert echo_server.peers == [fake_http_proxy.egress] == ["127.0.0.11"]
    assert fake_http_proxy.requests[0].method == "CONNECT"
    assert fake_http_proxy.requests[0].target == f"127.0.0.1:{echo_server.port}"


async def test_fake_http_absolute_form_with_auth(
    fake_http_proxy_factory: FakeHttpProxyFactory, origin: Origin
) -> None:
    proxy = await fake_http_proxy_factory(egress="127.0.0.12", auth=("user", "s3cret"))
    assert proxy.url == f"http://user:s3cret@127.0.0.1:{proxy.port}"
    async with aiohttp.ClientSession() as session:
        status, echo = await get_json(
            session, origin.url_for("/echo?q=1"), proxy=proxy.url, headers={"X-Proxy-Pool": "p"}
        )
        assert status == 200
        assert echo["peer"] == "127.0.0.12"
        assert echo["path"] == "/echo?q=1"
        assert "proxy-authorization" not in header_names(echo)
        assert ["Connection", "close"] in echo["headers"]
        seen = proxy.requests[-1]
        assert seen.target == origin.url_for("/echo?q=1")
        assert (
            seen.header("Proxy-Authorization")
            == "Basic " + base64.b64encode(b"user:s3cret").decode()
        )
        assert seen.header("X-Proxy-Pool") == "p"  # the fake strips nothing but hop-by-hop

        payload = pattern(300_000)
        async with session.post(
            origin.url_for("/upload"), data=payload, proxy=proxy.url
        ) as response:
            assert await response.json() == {"sha256": pattern_sha256(300_000), "length": 300_000}
        assert origin.count("/upload", "POST") == 1

        async with session.get(origin.url_for("/bytes/100000?chunked=1"), proxy=proxy.url) as r:
            assert hashlib.sha256(await r.read()).hexdigest() == pattern_sha256(100_000)

        bad = proxy.url.replace("s3cret", "wrong")
        async with session.get(origin.url_for("/echo"), proxy=bad) as response:
            assert response.status == 407
            assert response.headers["Proxy-Authenticate"].startswith("Basic")
    assert origin.count("/echo") == 1


async def test_fake_http_connect_needs_auth(
    fake_http_proxy_factory: FakeHttpProxyFactory, echo_server: EchoServer
) -> None:
    proxy = await fake_http_proxy_factory(auth=("user", "pw"))
    with pytest.raises(ProxyError) as raised:
        await Proxy.from_url(proxy.url.replace(":pw@", ":nope@")).connect(*echo_server.address)
    assert raised.value.error_code == 407
    async with through(proxy.url, *echo_server.address) as streams:
        assert await echo_round_trip(streams, b"x") == b"x" + trailer(1)


# -- fake SOCKS5 proxy -------------------------------------------------------------------------


async def test_fake_socks5_address_types(
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory, origin: Origin
) -> None:
    proxy = await fake_socks5_proxy_factory(egress="127.0.0.13", auth=("u", "p"))
    async with through(proxy.url, "127.0.0.1", origin.port) as streams:
        status, _, body = await http_get(streams, "127.0.0.1", "/echo")
    assert status == 200
    assert json.loads(body)["peer"] == "127.0.0.13"
    async with through(proxy.url, "localhost", origin.port, rdns=True) as streams:
        status, _, body = await http_get(streams, "localhost", "/echo")
    assert json.loads(body)["peer"] == "127.0.0.13"
    assert [(r.host, r.atyp, r.username) for r in proxy.requests] == [
        ("127.0.0.1", 1, "u"),
        ("localhost", 3, "u"),
    ]
    with pytest.raises(ProxyError):
        await Proxy.from_url(proxy.url.replace(":p@", ":x@")).connect("127.0.0.1", origin.port)


async def test_fake_socks5_ipv6_target(fake_socks5_proxy: FakeSocks5Proxy) -> None:
    async with EchoServer("::1") as echo, through(fake_socks5_proxy.url, "::1", echo.port) as s:
        assert await echo_round_trip(s, b"v6") == b"v6" + trailer(2)
    assert fake_socks5_proxy.requests[0].atyp == 4
    assert echo.peers == ["::1"]


# -- faults -----------------------------------------------------------------------------------


async def test_refused_ports(fake_http_proxy: FakeHttpProxy, echo_server: EchoServer) -> None:
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", closed_port())
    await fake_http_proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*fake_http_proxy.address)
    await fake_http_proxy.resume()
    async with through(fake_http_proxy.url, *echo_server.address) as streams:
        assert await echo_round_trip(streams, b"back") == b"back" + trailer(4)


async def test_blackhole(
    fake_http_proxy: FakeHttpProxy, fake_socks5_proxy: FakeSocks5Proxy, echo_server: EchoServer
) -> None:
    for proxy in (fake_http_proxy, fake_socks5_proxy):
        proxy.faults.blackhole = True
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await Proxy.from_url(proxy.url).connect(*echo_server.address, timeout=0.3)
        assert time.monotonic() - started < 2
    assert echo_server.accepted == []


async def test_reset_after(
    fake_http_proxy: FakeHttpProxy, fake_socks5_proxy: FakeSocks5Proxy, echo_server: EchoServer
) -> None:
    for proxy in (fake_http_proxy, fake_socks5_proxy):
        proxy.faults.reset_after = 10
        async with through(proxy.url, *echo_server.address) as (reader, writer):
            writer.write(b"y" * 100)
            with pytest.raises(ConnectionResetError):  # noqa: PT012
                received = b""
                while chunk := await asyncio.wait_for(reader.read(1024), 5):
                    received += chunk
                writer.write(b"more")
                await writer.drain()
            assert len(received) <= 10


async def test_reset_after_absolute_form(fake_http_proxy: FakeHttpProxy, origin: Origin) -> None:
    fake_http_proxy.faults.reset_after = 500
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(
                origin.url_for("/bytes/100000"), proxy=fake_http_proxy.url
            ) as response:
                await response.read()


@pytest.mark.parametrize("status", [407, 502])
async def test_connect_status(
    fake_http_proxy: FakeHttpProxy, origin: Origin, echo_server: EchoServer, status: int
) -> None:
    fake_http_proxy.faults.connect_status = status
    with pytest.raises(ProxyError) as raised:
        await Proxy.from_url(fake_http_proxy.url).connect(*echo_server.address)
    assert raised.value.error_code == status
    async with (
        aiohttp.ClientSession() as session,
        session.get(origin.url_for("/echo"), proxy=fake_http_proxy.url) as response,
    ):
        assert response.status == status
    assert origin.count("/echo") == 0
    assert echo_server.accepted == []


async def test_slow_handshake(
    fake_http_proxy: FakeHttpProxy, fake_socks5_proxy: FakeSocks5Proxy, echo_server: EchoServer
) -> None:
    for proxy in (fake_http_proxy, fake_socks5_proxy):
        proxy.faults.slow = 0.3
        started = time.monotonic()
        async with through(proxy.url, *echo_server.address) as streams:
            assert time.monotonic() - started >= 0.3
            assert await echo_round_trip(streams, b"z") == b"z" + trailer(1)


@pytest.mark.parametrize("code", [SocksReply.CONNECTION_REFUSED, SocksReply.HOST_UNREACHABLE])
async def test_socks_reply_code(
    fake_socks5_proxy: FakeSocks5Proxy, echo_server: EchoServer, code: int
) -> None:
    fake_socks5_proxy.faults.reply_code = code
    with pytest.raises(ProxyError) as raised:
        await Proxy.from_url(fake_socks5_proxy.url).connect(*echo_server.address)
    assert raised.value.error_code == code
    assert echo_server.accepted == []


async def test_target_refused_is_502_and_0x05(
    fake_http_proxy: FakeHttpProxy, fake_socks5_proxy: FakeSocks5Proxy, origin: Origin
) -> None:
    port = closed_port()
    with pytest.raises(ProxyError) as raised:
        await Proxy.from_url(fake_http_proxy.url).connect("127.0.0.1", port)
    assert raised.value.error_code == 502
    with pytest.raises(ProxyError) as raised:
        await Proxy.from_url(fake_socks5_proxy.url).connect("127.0.0.1", port)
    assert raised.value.error_code == SocksReply.CONNECTION_REFUSED
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/", proxy=fake_http_proxy.url) as response,
    ):
        assert response.status == 502
    # Only loopback targets are dialed, ever.
    with pytest.raises(ProxyError) as raised:
        await Proxy.from_url(fake_socks5_proxy.url).connect("192.0.2.1", 80)
    assert raised.value.error_code == SocksReply.NOT_ALLOWED


async def test_faults_for_some_connections_only(
    fake_socks5_proxy: FakeSocks5Proxy, echo_server: EchoServer
) -> None:
    fake_socks5_proxy.faults.reply_code = SocksReply.GENERAL_FAILURE
    fake_socks5_proxy.faults.times = 1
    with pytest.raises(ProxyError):
        await Proxy.from_url(fake_socks5_proxy.url).connect(*echo_server.address)
    async with through(fake_socks5_proxy.url, *echo_server.address) as streams:
        assert await echo_round_trip(streams, b"ok") == b"ok" + trailer(2)


# -- TLS through tunnels ----------------------------------------------------------------------


async def test_tls_origin_through_connect(
    fake_http_proxy: FakeHttpProxy, tls_origin: Origin, tls_material: TlsMaterial
) -> None:
    async with aiohttp.ClientSession() as session:
        status, echo = await get_json(
            session,
            tls_origin.url_for("/echo"),
            proxy=fake_http_proxy.url,
            ssl=tls_material.client_context(),
        )
    assert (status, echo["peer"]) == (200, fake_http_proxy.egress)
    assert fake_http_proxy.requests[0].method == "CONNECT"


async def test_tls_origin_through_socks(
    fake_socks5_proxy: FakeSocks5Proxy, tls_origin: Origin, tls_material: TlsMaterial
) -> None:
    async with through(
        fake_socks5_proxy.url, "127.0.0.1", tls_origin.port, tls=tls_material.client_context()
    ) as streams:
        status, _, body = await http_get(streams, "127.0.0.1", "/echo")
    assert (status, json.loads(body)["peer"]) == (200, fake_socks5_proxy.egress)


# -- Debian proxies ---------------------------------------------------------------------------


async def test_microsocks(
    microsocks_factory: DebianProxyFactory, origin: Origin, echo_server: EchoServer
) -> None:
    plain = await microsocks_factory(egress="127.0.0.21")
    secured = await microsocks_factory(egress="127.0.0.22", auth=("user", "pw"))
    assert plain.url == f"socks5://127.0.0.1:{plain.port}"
    for proxy in (plain, secured):
        async with through(proxy.url, "127.0.0.1", origin.port) as streams:
            status, _, body = await http_get(streams, "127.0.0.1", "/echo")
        assert (status, json.loads(body)["peer"]) == (200, proxy.egress)
    async with through(secured.url, *echo_server.address) as streams:
        await echo_without_half_close(streams, b"half")
    assert echo_server.peers == ["127.0.0.22"]
    with pytest.raises(ProxyError):
        await Proxy.from_url(secured.url.replace(":pw@", ":no@")).connect(*echo_server.address)
    with pytest.raises(ProxyError) as raised:
        await Proxy.from_url(plain.url).connect("127.0.0.1", closed_port())
    assert raised.value.error_code == SocksReply.CONNECTION_REFUSED


async def test_tinyproxy(
    tinyproxy_factory: DebianProxyFactory, origin: Origin, echo_server: EchoServer
) -> None:
    proxy: RunningProxy = await tinyproxy_factory(egress="127.0.0.31")
    async with aiohttp.ClientSession() as session:
        status, echo = await get_json(session, origin.url_for("/echo"), proxy=proxy.url)
    assert (status, echo["peer"]) == (200, "127.0.0.31")
    assert "via" not in header_names(echo)
    # CONNECT to a port other than 443/563.
    async with through(proxy.url, *echo_server.address) as streams:
        await echo_without_half_close(streams, b"tiny")
    assert echo_server.peers == ["127.0.0.31"]
    # A refused target is "500 Unable to connect" (not 502).
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{closed_port()}/", proxy=proxy.url) as response,
    ):
        assert response.status == 500


async def test_tinyproxy_auth_and_tls(
    tinyproxy_factory: DebianProxyFactory, tls_origin: Origin, tls_material: TlsMaterial
) -> None:
    proxy = await tinyproxy_factory(auth=("user", "pw"))
    async with aiohttp.ClientSession() as session:
        status, echo = await get_json(
            session, tls_origin.url_for("/echo"), proxy=proxy.url, ssl=tls_material.client_context()
        )
        assert (status, echo["peer"]) == (200, proxy.egress)
    # tinyproxy answers missing credentials with 407 but wrong ones with 401.
    for url, status in (
        (proxy.url.replace("user:pw@", ""), 407),
        (proxy.url.replace(":pw@", ":no@"), 401),
    ):
        with pytest.raises(ProxyError) as raised:
            await Proxy.from_url(url).connect("127.0.0.1", tls_origin.port)
        assert raised.value.error_code == status
