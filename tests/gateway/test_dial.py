"""`gateway.dial` over real loopback sockets: every scheme, the outcome of every failure, cleanup.

Upstreams are the rig's fakes, microsocks and tinyproxy, plus a few servers of this file's own
for what the fakes cannot do: a scripted upstream (exact reply bytes, then close, reset or hold),
a SOCKS4 server and a TLS front that turns the fake HTTP proxy into an https upstream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import ipaddress
import json
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

import pytest

from core.models import Outcome, Upstream
from gateway.channel import Channel, ChannelClosed
from gateway.dial import Dialed, DialMode, DialPolicy, basic_credentials, dial
from gateway.errors import DestinationDenied, LoopDetected, UpstreamError
from tests.support import net
from tests.support.fake_upstreams import FakeHttpProxy, FakeSocks5Proxy, closed_port
from tests.support.fixtures import *  # noqa: F403
from tests.support.fixtures import (
    DebianProxyFactory,
    FakeHttpProxyFactory,
    FakeSocks5ProxyFactory,
)
from tests.support.net import TcpServer, pipe, relay, reset
from tests.support.origin import EchoServer, Origin, TlsMaterial

TIMEOUT = 0.3
PASSWORD = "s3cret-pässword"  # non-ASCII: percent-decoding and UTF-8 Basic credentials


# -- helpers --------------------------------------------------------------------------------------


def upstream(url: str) -> Upstream:
    return Upstream.from_url(url, "test")


async def dial_ok(up: Upstream, host: str, port: int, **kwargs: Any) -> Dialed:
    kwargs.setdefault("tunnel", True)
    kwargs.setdefault("connect_timeout", 5.0)
    return await dial(up, host, port, **kwargs)


async def dial_fails(
    up: Upstream, host: str, port: int, outcome: Outcome, **kwargs: Any
) -> UpstreamError:
    """Dial, expect `outcome`, and check the error names the upstream by id only."""
    kwargs.setdefault("tunnel", True)
    kwargs.setdefault("connect_timeout", 5.0)
    with pytest.raises(UpstreamError) as info:
        await dial(up, host, port, **kwargs)
    error = info.value
    assert error.outcome is outcome, str(error)
    assert error.next_hop == up.id
    assert error.retryable
    endpoint = up.endpoint
    texts = (str(error), error.details, error.proxy_status())
    secrets = [f"{endpoint.host}:{endpoint.port}", endpoint.password, endpoint.username]
    for secret in filter(None, secrets):
        assert all(secret not in text for text in texts), (secret, texts)
    assert str(endpoint.port) not in str(error)
    return error


async def read_at_least(channel: Channel, size: int, early: bytes = b"") -> bytes:
    data = bytearray(early)
    while len(data) + len(channel.buffer) < size:
        await channel.read_more()
    data += channel.take_buffer()
    return bytes(data)


async def echo_roundtrip(dialed: Dialed, payload: bytes = b"hello through the tunnel") -> None:
    dialed.channel.write(payload)
    assert await asyncio.wait_for(read_at_least(dialed.channel, len(payload)), 5) == payload


async def http_exchange(channel: Channel, request: bytes) -> dict[str, Any]:
    """Send a `Connection: close` request, read to EOF, return the JSON body."""
    channel.write(request)
    data = bytearray()
    with contextlib.suppress(ChannelClosed):
        while True:
            await asyncio.wait_for(channel.read_more(), 5)
            data += channel.take_buffer()
    data += channel.take_buffer()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    result: dict[str, Any] = json.loads(body)
    return result


async def origin_peer(dialed: Dialed, origin: Origin) -> str:
    """The client address the origin saw for a GET /echo through a tunnel."""
    request = f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nConnection: close\r\n\r\n"
    body = await http_exchange(dialed.channel, request.encode())
    return str(body["peer"])


def close(dialed: Dialed) -> None:
    dialed.channel.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- servers of this file's own -------------------------------------------------------------------


class Scripted(TcpServer):
    """Reads the start of a handshake, answers exactly `reply`, then closes, resets or holds.

    `until`: bytes marker to read up to, a byte count, or None for whatever one read returns.
    `then="hold"` reads until the client closes and sets `peer_closed`.
    """

    def __init__(
        self, reply: bytes = b"", *, then: str = "close", until: bytes | int | None = b"\r\n\r\n"
    ) -> None:
        super().__init__()
        self.reply = reply
        self.then = then
        self.until = until
        self.received: list[bytes] = []
        self.peer_closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if isinstance(self.until, bytes):
            data = await reader.readuntil(self.until)
        elif isinstance(self.until, int):
            data = await reader.readexactly(self.until)
        else:
            data = await reader.read(65536)
        self.received.append(data)
        if self.reply:
            writer.write(self.reply)
            await writer.drain()
        if self.then == "reset":
            reset(writer)
        elif self.then == "hold":
            while await reader.read(65536):
                pass
            self.peer_closed.set()


class Socks4Server(TcpServer):
    """SOCKS4 and 4a CONNECT to loopback targets; answers `reply_code` instead when set."""

    def __init__(self, reply_code: int | None = None) -> None:
        super().__init__()
        self.reply_code = reply_code
        self.requests: list[tuple[str, int, str]] = []  # host, port, user id

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(8)
        port, packed = int.from_bytes(head[2:4], "big"), head[4:8]
        user = (await reader.readuntil(b"\0"))[:-1].decode()
        if packed[:3] == b"\0\0\0" and packed[3]:  # SOCKS4a: the name follows
            host = (await reader.readuntil(b"\0"))[:-1].decode()
        else:
            host = socket.inet_ntoa(packed)
        self.requests.append((host, port, user))
        if self.reply_code is not None:
            writer.write(bytes([0, self.reply_code]) + head[2:8])
            return
        target = await self.open_connection("127.0.0.1" if host == "localhost" else host, port)
        try:
            writer.write(b"\x00\x5a" + head[2:8])
            await writer.drain()
            await relay((reader, writer), target)
        finally:
            await self.close_writer(target[1])


class TlsFront(TcpServer):
    """Terminates TLS and relays to `backend`: an https upstream made of the fake HTTP proxy."""

    def __init__(self, backend: tuple[str, int], context: ssl.SSLContext) -> None:
        super().__init__()
        self.backend = backend
        self.context = context

    async def start(self) -> Self:
        server = await asyncio.start_server(self._on_connect, self.host, 0, ssl=self.context)
        self._listening = server
        self._servers.append(server)
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # TLS cannot half-close: once the backend is done, the whole TLS connection ends.
        target_reader, target_writer = await self.open_connection(*self.backend)
        upstream = asyncio.create_task(pipe(reader, target_writer))
        try:
            await pipe(target_reader, writer)
        finally:
            upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
            await self.close_writer(target_writer)


@pytest.fixture(autouse=True)
def _tolerate_cancelled_close_waiter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Work around a race in the rig's `TcpServer.close()`.

    It cancels the handler tasks, and a handler cancelled inside its final
    `writer.wait_closed()` cancels that writer's shared close-waiter future; `close()` then awaits
    the same future again and fails with CancelledError. Until the rig shields that wait, its
    `close_writer` here takes an already cancelled waiter as "closing".
    """

    async def close_writer(writer: asyncio.StreamWriter) -> None:
        if not writer.is_closing():
            writer.close()
        try:
            with contextlib.suppress(Exception):  # as the rig's own close_writer does
                await writer.wait_closed()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            await asyncio.sleep(0)  # let the transport's connection_lost run

    monkeypatch.setattr(net, "close_writer", close_writer)


@pytest.fixture
async def servers() -> AsyncIterator[list[TcpServer]]:
    """Servers of this file, started by `await start(servers, Scripted(...))`, closed after."""
    started: list[TcpServer] = []
    yield started
    for server in reversed(started):
        await server.close()


async def start(servers: list[TcpServer], server: TcpServer) -> Any:
    servers.append(server)
    return await server.start()


def url(scheme: str, server: TcpServer, auth: str = "") -> str:
    return f"{scheme}://{auth}127.0.0.1:{server.port}"


# -- http -----------------------------------------------------------------------------------------


async def test_http_tunnel_reaches_target_from_egress(
    fake_http_proxy: FakeHttpProxy, echo_server: EchoServer, origin: Origin
) -> None:
    up = upstream(fake_http_proxy.url)
    dialed = await dial_ok(up, "127.0.0.1", echo_server.port)
    assert (dialed.mode, dialed.early) == (DialMode.TUNNEL, b"")
    assert 0 < dialed.connect_latency < 5
    await echo_roundtrip(dialed)
    close(dialed)
    assert echo_server.peers == [fake_http_proxy.egress]
    request = fake_http_proxy.requests[0]
    assert (request.method, request.target) == ("CONNECT", f"127.0.0.1:{echo_server.port}")
    assert request.header("Host") == f"127.0.0.1:{echo_server.port}"
    assert request.header("Proxy-Authorization") is None

    dialed = await dial_ok(up, "localhost", origin.port)
    assert await origin_peer(dialed, origin) == fake_http_proxy.egress
    close(dialed)


async def test_http_credentials_are_sent(
    fake_http_proxy_factory: FakeHttpProxyFactory, echo_server: EchoServer
) -> None:
    proxy = await fake_http_proxy_factory(auth=("us er", PASSWORD))
    up = upstream(proxy.url)
    dialed = await dial_ok(up, "127.0.0.1", echo_server.port)
    await echo_roundtrip(dialed)
    close(dialed)
    expected = "Basic " + base64.b64encode(f"us er:{PASSWORD}".encode()).decode()
    assert proxy.requests[0].header("Proxy-Authorization") == expected
    assert basic_credentials(up.endpoint) == expected.encode()


async def test_http_forward_mode_sends_no_connect(
    fake_http_proxy_factory: FakeHttpProxyFactory, origin: Origin
) -> None:
    proxy = await fake_http_proxy_factory(auth=("user", PASSWORD))
    up = upstream(proxy.url)
    dialed = await dial_ok(up, "127.0.0.1", origin.port, tunnel=False)
    assert (dialed.mode, dialed.early) == (DialMode.FORWARD, b"")
    await asyncio.sleep(0.05)
    assert proxy.requests == []
    credentials = basic_credentials(up.endpoint)
    request = (
        f"GET {origin.url_for('/echo')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        f"Proxy-Authorization: {credentials.decode()}\r\nConnection: close\r\n\r\n"
    )
    body = await http_exchange(dialed.channel, request.encode())
    assert body["peer"] == proxy.egress
    close(dialed)


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 Connection established\r\n\r\nEARLY",
        b"HTTP/1.0 200 OK\r\nProxy-Agent: x\r\n\r\nEARLY",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nEARLY",
    ],
)
async def test_http_early_bytes_after_the_reply_are_kept(
    servers: list[TcpServer], reply: bytes
) -> None:
    proxy = await start(servers, Scripted(reply, then="hold"))
    dialed = await dial_ok(upstream(url("http", proxy)), "example.test", 443)
    assert dialed.early == b"EARLY"
    assert dialed.channel.buffer == b""
    close(dialed)


async def test_http_ipv6_target_in_brackets(servers: list[TcpServer]) -> None:
    proxy = await start(servers, Scripted(b"HTTP/1.1 200 OK\r\n\r\n", then="hold"))
    close(await dial_ok(upstream(url("http", proxy)), "2001:db8::1", 8443))
    assert proxy.received == [
        b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n"
    ]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (301, Outcome.PROXY_ERROR),
        (400, Outcome.PROXY_ERROR),
        (403, Outcome.PROXY_ERROR),
        (407, Outcome.PROXY_AUTH_FAILED),
        (500, Outcome.TARGET_UNREACHABLE),
        (502, Outcome.TARGET_UNREACHABLE),
        (503, Outcome.TARGET_UNREACHABLE),
        (504, Outcome.TARGET_UNREACHABLE),
    ],
)
async def test_http_connect_status_outcomes(
    fake_http_proxy_factory: FakeHttpProxyFactory,
    echo_server: EchoServer,
    status: int,
    outcome: Outcome,
) -> None:
    proxy = await fake_http_proxy_factory(auth=("user", PASSWORD))
    proxy.faults.connect_status = status
    error = await dial_fails(upstream(proxy.url), "127.0.0.1", echo_server.port, outcome)
    assert str(status) in error.details


async def test_http_wrong_credentials_and_refused_target(
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    proxy = await fake_http_proxy_factory(auth=("user", PASSWORD))
    wrong = upstream(url("http", proxy, "user:wrong-password@"))
    await dial_fails(wrong, "127.0.0.1", closed_port(), Outcome.PROXY_AUTH_FAILED)
    # The fake answers 502 for a refused target: the upstream is fine, the target is not.
    await dial_fails(upstream(proxy.url), "127.0.0.1", closed_port(), Outcome.TARGET_UNREACHABLE)


@pytest.mark.parametrize(
    ("reply", "then", "outcome"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "close", Outcome.PROXY_ERROR),  # not HTTP
        (b"HTTP/1.1 200 OK\r\nX-Cut: sho", "close", Outcome.PROXY_ERROR),  # head cut short
        (b"", "close", Outcome.PROXY_ERROR),  # closed without a reply
        (b"", "reset", Outcome.RESET),
        (b"HTTP/1.1 200 OK\r\n", "reset", Outcome.RESET),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "hold", Outcome.PROXY_ERROR),
    ],
)
async def test_http_broken_replies(
    servers: list[TcpServer], reply: bytes, then: str, outcome: Outcome
) -> None:
    proxy = await start(servers, Scripted(reply, then=then))
    await dial_fails(upstream(url("http", proxy, f"user:{PASSWORD}@")), "example.test", 80, outcome)


async def test_http_refused_and_blackhole(fake_http_proxy: FakeHttpProxy) -> None:
    up = upstream(fake_http_proxy.url)
    fake_http_proxy.faults.blackhole = True
    started = time.monotonic()
    await dial_fails(up, "127.0.0.1", 80, Outcome.CONNECT_TIMEOUT, connect_timeout=TIMEOUT)
    assert TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT + 0.5
    await fake_http_proxy.refuse()
    await dial_fails(up, "127.0.0.1", 80, Outcome.CONNECT_REFUSED)


async def test_invalid_target_is_refused_before_connecting(fake_http_proxy: FakeHttpProxy) -> None:
    up = upstream(fake_http_proxy.url)
    for host, port in [("bad host", 80), ("a\r\nX-Injected: 1", 80), ("ok.test", 0), ("", 80)]:
        await dial_fails(up, host, port, Outcome.TARGET_UNREACHABLE)
    assert fake_http_proxy.connections == 0


async def test_tinyproxy(tinyproxy_factory: DebianProxyFactory, echo_server: EchoServer) -> None:
    proxy = await tinyproxy_factory(auth=("user", "tinypass"))
    up = upstream(proxy.url)
    dialed = await dial_ok(up, "127.0.0.1", echo_server.port)
    await echo_roundtrip(dialed)
    close(dialed)
    assert echo_server.peers == [proxy.egress]
    # tinyproxy answers a refused target with "500 Unable to connect": the target's fault.
    await dial_fails(up, "127.0.0.1", closed_port(), Outcome.TARGET_UNREACHABLE)
    # Missing credentials get 407, wrong ones 401 (tinyproxy 1.11): both are auth failures.
    bare = upstream(f"http://127.0.0.1:{proxy.port}")
    await dial_fails(bare, "127.0.0.1", echo_server.port, Outcome.PROXY_AUTH_FAILED)
    wrong = upstream(f"http://user:wrong@127.0.0.1:{proxy.port}")
    await dial_fails(wrong, "127.0.0.1", echo_server.port, Outcome.PROXY_AUTH_FAILED)


# -- https ----------------------------------------------------------------------------------------


@pytest.fixture
async def https_proxy(
    fake_http_proxy_factory: FakeHttpProxyFactory,
    tls_material: TlsMaterial,
    servers: list[TcpServer],
) -> tuple[FakeHttpProxy, Upstream]:
    proxy = await fake_http_proxy_factory(auth=("user", PASSWORD))
    front = await start(servers, TlsFront(proxy.address, tls_material.server_context()))
    return proxy, upstream(url("https", front, f"user:{PASSWORD}@"))


async def test_https_tunnel_and_forward(
    https_proxy: tuple[FakeHttpProxy, Upstream],
    tls_material: TlsMaterial,
    echo_server: EchoServer,
    origin: Origin,
) -> None:
    proxy, up = https_proxy
    context = tls_material.client_context()
    dialed = await dial_ok(up, "127.0.0.1", echo_server.port, ssl_context=context)
    assert dialed.mode is DialMode.TUNNEL
    assert dialed.channel.transport is not None
    assert dialed.channel.transport.get_extra_info("ssl_object") is not None
    await echo_roundtrip(dialed)
    close(dialed)
    assert echo_server.peers == [proxy.egress]
    assert proxy.requests[0].header("Proxy-Authorization") is not None

    dialed = await dial_ok(up, "127.0.0.1", origin.port, tunnel=False, ssl_context=context)
    assert dialed.mode is DialMode.FORWARD
    credentials = basic_credentials(up.endpoint)
    request = (
        f"GET {origin.url_for('/echo')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
        f"Proxy-Authorization: {credentials.decode()}\r\nConnection: close\r\n\r\n"
    )
    assert (await http_exchange(dialed.channel, request.encode()))["peer"] == proxy.egress
    close(dialed)


async def test_https_untrusted_certificate_is_tls_error(
    https_proxy: tuple[FakeHttpProxy, Upstream], echo_server: EchoServer
) -> None:
    proxy, up = https_proxy
    # The default verifying context does not trust the test CA.
    error = await dial_fails(up, "127.0.0.1", echo_server.port, Outcome.TLS_ERROR)
    assert "CERTIFICATE_VERIFY_FAILED" in error.details
    assert proxy.requests == []


@pytest.mark.parametrize(
    ("server", "outcome"),
    [
        pytest.param(
            lambda: Scripted(b"HTTP/1.1 400 Bad Request\r\n\r\n", until=None),
            Outcome.TLS_ERROR,
            id="plain-http",
        ),
        pytest.param(lambda: Scripted(until=None), Outcome.TLS_ERROR, id="closed"),
        pytest.param(lambda: Scripted(until=None, then="reset"), Outcome.TLS_ERROR, id="reset"),
        pytest.param(
            lambda: Scripted(until=0, then="hold"), Outcome.CONNECT_TIMEOUT, id="no-answer"
        ),
    ],
)
async def test_https_handshake_failures(
    servers: list[TcpServer], tls_material: TlsMaterial, server: Any, outcome: Outcome
) -> None:
    proxy = await start(servers, server())
    up = upstream(url("https", proxy, f"user:{PASSWORD}@"))
    context = tls_material.client_context()
    await dial_fails(up, "example.test", 443, outcome, ssl_context=context, connect_timeout=TIMEOUT)


# -- socks ----------------------------------------------------------------------------------------


async def test_socks5_tunnel_from_egress(
    fake_socks5_proxy: FakeSocks5Proxy, echo_server: EchoServer, origin: Origin
) -> None:
    up = upstream(fake_socks5_proxy.url)
    # tunnel=False means the same as True for SOCKS: the gateway writes origin-form requests.
    for tunnel in (True, False):
        dialed = await dial_ok(up, "127.0.0.1", echo_server.port, tunnel=tunnel)
        assert (dialed.mode, dialed.early) == (DialMode.TUNNEL, b"")
        await echo_roundtrip(dialed)
        close(dialed)
    assert echo_server.peers == [fake_socks5_proxy.egress] * 2
    assert fake_socks5_proxy.requests[0].atyp == 1

    dialed = await dial_ok(up, "localhost", origin.port)
    assert await origin_peer(dialed, origin) == fake_socks5_proxy.egress
    close(dialed)
    # Names always go to the upstream (rdns), socks5 or socks5h alike.
    assert (fake_socks5_proxy.requests[-1].host, fake_socks5_proxy.requests[-1].atyp) == (
        "localhost",
        3,
    )


async def test_socks5_credentials(
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory, echo_server: EchoServer
) -> None:
    proxy = await fake_socks5_proxy_factory(auth=("user", "pw-socks"))
    dialed = await dial_ok(
        upstream(proxy.url.replace("socks5", "socks5h")), "localhost", echo_server.port
    )
    await echo_roundtrip(dialed)
    close(dialed)
    assert proxy.requests[0].username == "user"
    wrong = upstream(url("socks5", proxy, "user:wrong-pw@"))
    await dial_fails(wrong, "127.0.0.1", echo_server.port, Outcome.PROXY_AUTH_FAILED)
    # No credentials for a server that demands them: it offers no acceptable method (0xFF).
    await dial_fails(upstream(url("socks5", proxy)), "127.0.0.1", 1, Outcome.PROXY_AUTH_FAILED)
    # python-socks sends SOCKS credentials as ASCII only.
    unsendable = upstream(url("socks5", proxy, "user:p%C3%A4ss@"))
    await dial_fails(unsendable, "127.0.0.1", 1, Outcome.PROXY_AUTH_FAILED)


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0x01, Outcome.PROXY_ERROR),
        (0x02, Outcome.PROXY_ERROR),
        (0x03, Outcome.TARGET_UNREACHABLE),
        (0x04, Outcome.TARGET_UNREACHABLE),
        (0x05, Outcome.TARGET_REFUSED),
        (0x06, Outcome.TARGET_UNREACHABLE),
        (0x07, Outcome.PROXY_ERROR),
        (0x08, Outcome.PROXY_ERROR),
        (0x42, Outcome.PROXY_ERROR),  # not a reply code at all
    ],
)
async def test_socks5_reply_codes(
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory, code: int, outcome: Outcome
) -> None:
    proxy = await fake_socks5_proxy_factory(auth=("user", "pw-socks"))
    proxy.faults.reply_code = code
    await dial_fails(upstream(proxy.url), "127.0.0.1", 443, outcome)


async def test_socks5_transport_failures(fake_socks5_proxy: FakeSocks5Proxy) -> None:
    up = upstream(fake_socks5_proxy.url)
    # A real refusal by the target, reported by the upstream as 0x05.
    await dial_fails(up, "127.0.0.1", closed_port(), Outcome.TARGET_REFUSED)
    # A target name python-socks cannot IDNA-encode: the target's fault, not the upstream's.
    await dial_fails(up, "a" * 64 + ".test", 443, Outcome.TARGET_UNREACHABLE)
    fake_socks5_proxy.faults.blackhole = True
    started = time.monotonic()
    await dial_fails(up, "127.0.0.1", 443, Outcome.CONNECT_TIMEOUT, connect_timeout=TIMEOUT)
    assert TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT + 0.5
    await fake_socks5_proxy.refuse()
    await dial_fails(up, "127.0.0.1", 443, Outcome.CONNECT_REFUSED)


@pytest.mark.parametrize(
    ("reply", "then", "outcome"),
    [
        (b"", "close", Outcome.PROXY_ERROR),  # closed without a reply
        (b"\x05", "close", Outcome.PROXY_ERROR),  # reply cut short
        (b"\x05\x00", "reset", Outcome.RESET),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "close", Outcome.PROXY_ERROR),
    ],
)
async def test_socks5_broken_handshakes(
    servers: list[TcpServer], reply: bytes, then: str, outcome: Outcome
) -> None:
    proxy = await start(servers, Scripted(reply, then=then, until=3))
    await dial_fails(upstream(url("socks5", proxy)), "127.0.0.1", 443, outcome)


async def test_microsocks(microsocks_factory: DebianProxyFactory, echo_server: EchoServer) -> None:
    proxy = await microsocks_factory(auth=("user", "microsecret"))
    up = upstream(proxy.url)
    dialed = await dial_ok(up, "127.0.0.1", echo_server.port)
    await echo_roundtrip(dialed)
    close(dialed)
    assert echo_server.peers == [proxy.egress]
    await dial_fails(up, "127.0.0.1", closed_port(), Outcome.TARGET_REFUSED)
    # A real SOCKS5 server rejecting credentials, or wanting some: pins python-socks' wording.
    wrong = upstream(f"socks5://user:wrong@127.0.0.1:{proxy.port}")
    error = await dial_fails(wrong, "127.0.0.1", echo_server.port, Outcome.PROXY_AUTH_FAILED)
    assert error.details == "upstream rejected the credentials"
    bare = upstream(f"socks5://127.0.0.1:{proxy.port}")
    error = await dial_fails(bare, "127.0.0.1", echo_server.port, Outcome.PROXY_AUTH_FAILED)
    assert "none of the offered authentication methods" in error.details


async def test_socks4_and_4a(servers: list[TcpServer], echo_server: EchoServer) -> None:
    proxy = await start(servers, Socks4Server())
    for scheme, host in [
        ("socks4", "127.0.0.1"),
        ("socks4", "localhost"),
        ("socks4a", "localhost"),
    ]:
        dialed = await dial_ok(upstream(url(scheme, proxy, "ident@")), host, echo_server.port)
        assert (dialed.mode, dialed.early) == (DialMode.TUNNEL, b"")
        await echo_roundtrip(dialed)
        close(dialed)
    # socks4 with a name becomes 4a: the upstream resolves it.
    assert [host for host, _, _ in proxy.requests] == ["127.0.0.1", "localhost", "localhost"]
    assert {user for _, _, user in proxy.requests} == {"ident"}


@pytest.mark.parametrize("code", [0x5B, 0x5C, 0x5D])
async def test_socks4_rejections(servers: list[TcpServer], code: int) -> None:
    proxy = await start(servers, Socks4Server(reply_code=code))
    await dial_fails(upstream(url("socks4", proxy)), "127.0.0.1", 443, Outcome.TARGET_UNREACHABLE)


# -- direct ---------------------------------------------------------------------------------------


async def test_direct_tunnel_and_source_address(echo_server: EchoServer, origin: Origin) -> None:
    dialed = await dial_ok(upstream("direct://"), "127.0.0.1", echo_server.port, tunnel=False)
    assert (dialed.mode, dialed.early) == (DialMode.TUNNEL, b"")
    await echo_roundtrip(dialed)
    close(dialed)
    source = upstream("direct://127.0.0.5")
    dialed = await dial_ok(source, "localhost", origin.port)
    assert await origin_peer(dialed, origin) == "127.0.0.5"
    close(dialed)
    # An IPv4-mapped literal is dialled as the IPv4 address it is.
    dialed = await dial_ok(source, "::ffff:127.0.0.1", origin.port)
    assert await origin_peer(dialed, origin) == "127.0.0.5"
    close(dialed)


async def test_direct_failures(echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    up = upstream("direct://")
    # A dead target must not eject the direct upstream: these are the target's outcomes.
    await dial_fails(up, "127.0.0.1", closed_port(), Outcome.TARGET_REFUSED)
    await dial_fails(upstream("direct://127.0.0.5"), "::1", 80, Outcome.TARGET_UNREACHABLE)
    # A source address this host does not have is the direct upstream's own fault.
    await dial_fails(upstream("direct://192.0.2.1"), "127.0.0.1", 80, Outcome.CONNECT_REFUSED)

    loop = asyncio.get_running_loop()

    async def no_such_name(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def slow_resolver(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(10)

    # No real lookups: the sandbox's resolver is not on loopback.
    monkeypatch.setattr(loop, "getaddrinfo", no_such_name)
    await dial_fails(up, "no-such-host.test", 80, Outcome.TARGET_UNREACHABLE)
    monkeypatch.setattr(loop, "getaddrinfo", slow_resolver)
    await dial_fails(up, "slow.test", 80, Outcome.TARGET_UNREACHABLE, connect_timeout=TIMEOUT)


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A loopback port whose accept queue is full: the kernel drops further SYNs."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        time.sleep(0.05)
        yield port


async def test_direct_timeout() -> None:
    with full_backlog() as port:
        started = time.monotonic()
        await dial_fails(
            upstream("direct://"),
            "127.0.0.1",
            port,
            Outcome.CONNECT_TIMEOUT,
            connect_timeout=TIMEOUT,
        )
        assert TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT + 0.5


async def test_direct_policy(echo_server: EchoServer) -> None:
    up = upstream("direct://")
    port = echo_server.port
    loopback = DialPolicy(deny=(ipaddress.ip_network("127.0.0.0/8"),))
    # Checked on the resolved addresses: a name is no way around the deny list.
    for host in ("127.0.0.1", "localhost", "::ffff:127.0.0.1"):
        with pytest.raises(DestinationDenied, match="denied by policy") as info:
            await dial_ok(up, host, port, policy=loopback)
        assert not isinstance(info.value, UpstreamError)
    only_443 = DialPolicy(allowed_ports=frozenset({443}))
    with pytest.raises(DestinationDenied, match="port"):
        await dial_ok(up, "localhost", port, policy=only_443)
    for own in [("127.0.0.1", port), ("0.0.0.0", port), ("::", port)]:
        with pytest.raises(LoopDetected):
            await dial_ok(up, "localhost", port, policy=DialPolicy(own_addresses=frozenset({own})))
    assert echo_server.accepted == []

    # The port list is for tunnels: a plain HTTP request (tunnel=False) may use any port.
    dialed = await dial_ok(up, "localhost", port, policy=only_443, tunnel=False)
    close(dialed)
    allowing = DialPolicy(
        deny=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")),
        allowed_ports=frozenset({port}),
        own_addresses=frozenset({("127.0.0.1", 1), ("0:0::1", port)}),
    )
    dialed = await dial_ok(up, "localhost", port, policy=allowing)
    await echo_roundtrip(dialed)
    close(dialed)
    assert len(echo_server.accepted) == 2
    allowing.check("192.0.2.7", port)
    with pytest.raises(LoopDetected):
        allowing.check("::1", port)  # own addresses are compared in canonical form
    with pytest.raises(DestinationDenied):
        loopback.check("127.1.2.3", port)


# -- cancellation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "until"),
    [
        ("http", b"\r\n\r\n"),  # waiting for the CONNECT reply
        ("https", 0),  # in the TLS handshake
        ("socks5", 3),  # python-socks waiting for the method selection
        ("socks4", 9),  # python-socks waiting for the SOCKS4 reply
    ],
)
async def test_cancelled_dial_closes_its_socket(
    servers: list[TcpServer], tls_material: TlsMaterial, scheme: str, until: bytes | int
) -> None:
    proxy: Scripted = await start(servers, Scripted(until=until, then="hold"))
    before = open_fds()
    task = asyncio.create_task(
        dial(
            upstream(url(scheme, proxy, f"user:{PASSWORD}@" if scheme != "socks4" else "")),
            "127.0.0.1",
            443,
            tunnel=True,
            connect_timeout=10,
            ssl_context=tls_material.client_context(),
        )
    )
    await eventually(lambda: bool(proxy.received))
    await asyncio.sleep(0.02)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(proxy.peer_closed.wait(), 10)
    await eventually(lambda: open_fds() <= before)
    gc.collect()  # an unclosed socket would raise its ResourceWarning here (warnings are errors)


@pytest.mark.parametrize(("scheme", "until"), [("http", b"\r\n\r\n"), ("https", 0), ("socks5", 3)])
async def test_timed_out_dial_closes_its_socket(
    servers: list[TcpServer], tls_material: TlsMaterial, scheme: str, until: bytes | int
) -> None:
    proxy: Scripted = await start(servers, Scripted(until=until, then="hold"))
    before = open_fds()
    await dial_fails(
        upstream(url(scheme, proxy)),
        "example.test",
        443,
        Outcome.CONNECT_TIMEOUT,
        connect_timeout=TIMEOUT,
        ssl_context=tls_material.client_context(),
    )
    await asyncio.wait_for(proxy.peer_closed.wait(), 10)
    await eventually(lambda: open_fds() <= before)
    gc.collect()


async def test_failed_dials_leave_no_socket(
    fake_http_proxy: FakeHttpProxy, fake_socks5_proxy: FakeSocks5Proxy
) -> None:
    before = open_fds()
    fake_http_proxy.faults.connect_status = 502
    fake_socks5_proxy.faults.reply_code = 0x05
    for _ in range(5):
        await dial_fails(upstream(fake_http_proxy.url), "127.0.0.1", 80, Outcome.TARGET_UNREACHABLE)
        await dial_fails(upstream(fake_socks5_proxy.url), "127.0.0.1", 80, Outcome.TARGET_REFUSED)
        await dial_fails(upstream("direct://"), "127.0.0.1", closed_port(), Outcome.TARGET_REFUSED)
    await eventually(lambda: open_fds() <= before)
    gc.collect()  # an unclosed socket would raise its ResourceWarning here (warnings are errors)
