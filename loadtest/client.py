"""The load generator's connections: through an HTTP proxy, a CONNECT tunnel or SOCKS5.

A `Conn` is an asyncio protocol over one TCP connection: a raw phase for the proxy handshake
(CONNECT head, SOCKS5 messages), then HTTP/1.1 responses parsed by httptools (the C parser
the gateway uses too), optionally over TLS started inside the tunnel. Body bytes are counted
as they arrive (into `Counters.bytes`), never kept, except the small `/who` bodies that tell
which upstream carried a request.

Every failure is a `ClientError` whose `kind` names it in the report: `connect_refused`,
`reset`, `closed` (EOF before the response ended), `http_503`, `connect_502` (CONNECT
answered 502), `socks_05` (SOCKS5 reply 0x05), `tls_error`, `bad_response`, `timeout`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import socket
import ssl
from dataclasses import dataclass, field
from typing import cast

import httptools

__all__ = ["ClientError", "Conn", "Counters", "Plan", "Response", "classify", "open_conn"]

_MAX_HEAD = 64 * 1024


class ClientError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def classify(exc: BaseException) -> str:
    """The report's name for a failure."""
    if isinstance(exc, ClientError):
        return exc.kind
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, OSError):
        return f"os_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"
    return type(exc).__name__


class Counters:
    """Running totals the progress line and the timeline sample."""

    __slots__ = ("bytes", "errors", "requests")

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.errors = 0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    length: int
    body: bytes | None  # only when asked for


@dataclass(frozen=True)
class Plan:
    """How to reach the origin: `mode` "http" (absolute-form through an HTTP proxy),
    "connect" (a CONNECT tunnel), "socks5", or "origin" (no proxy at all)."""

    mode: str
    proxy: tuple[str, int]
    origin: tuple[str, int]
    path: str
    keepalive: bool = True
    tls: bool = False
    cafile: str | None = None
    #: The header that names a session: "X-Proxy-Session" (on the request, or the CONNECT).
    session_header: str = "X-Proxy-Session"
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    def with_tls_context(self) -> Plan:
        if not self.tls or self.ssl_context is not None:
            return self
        return dataclasses.replace(self, ssl_context=ssl.create_default_context(cafile=self.cafile))

    @property
    def authority(self) -> bytes:
        return b"%s:%d" % (self.origin[0].encode(), self.origin[1])

    def request(self, session: str | None) -> bytes:
        """One GET request as sent on the (proxied or tunnelled) connection."""
        close = b"" if self.keepalive else b"Connection: close\r\n"
        if self.mode == "http":
            scheme = b"https" if self.tls else b"http"
            target = b"%s://%s%s" % (scheme, self.authority, self.path.encode())
            extra = (
                b""
                if session is None
                else b"%s: %s\r\n"
                % (
                    self.session_header.encode(),
                    session.encode(),
                )
            )
        else:
            target, extra = self.path.encode(), b""
        return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (target, self.authority, extra, close)


class Conn(asyncio.Protocol):
    """One client connection; see the module docstring."""

    __slots__ = (
        "_body",
        "_buf",
        "_counters",
        "_length",
        "_loop",
        "_parser",
        "_status",
        "_waiter",
        "_want",
        "closed",
        "keep_alive",
        "transport",
    )

    def __init__(self, counters: Counters) -> None:
        self._loop = asyncio.get_running_loop()
        self._counters = counters
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self._buf = bytearray()
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[object] | None = None
        self._want: bytes | int = b""
        self._status = 0
        self._length = 0
        self._body: list[bytes] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._parser is not None:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError:
                self._fail(ClientError("bad_response"))
                self.close()
            return
        self._buf += data
        self._check_raw()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if isinstance(exc, ssl.SSLError):
            kind = "tls_error"
        else:
            kind = "reset" if exc is not None else "closed"
        self._fail(ClientError(kind))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._length += len(body)
        self._counters.bytes += len(body)
        if self._body is not None:
            self._body.append(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()
        body = b"".join(self._body) if self._body is not None else None
        self._resolve(Response(self._status, self._length, body))

    # -- raw phase ----------------------------------------------------------------------------

    def _check_raw(self) -> None:
        want, buf = self._want, self._buf
        if self._waiter is None:
            return
        if isinstance(want, bytes):
            end = buf.find(want) if want else -1
            if end >= 0:
                data = bytes(buf[: end + len(want)])
                del buf[: end + len(want)]
                self._resolve(data)
            elif len(buf) > _MAX_HEAD:
                self._fail(ClientError("bad_response"))
        elif len(buf) >= want:
            data = bytes(buf[:want])
            del buf[:want]
            self._resolve(data)

    async def _read(self, want: bytes | int) -> bytes:
        self._want = want
        waiter = self._arm()
        self._check_raw()
        data = await waiter
        assert isinstance(data, bytes)
        return data

    def _arm(self) -> asyncio.Future[object]:
        if self.closed:
            raise ClientError("closed")
        self._waiter = self._loop.create_future()
        return self._waiter

    def _resolve(self, value: object) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def write(self, data: bytes) -> None:
        if self.transport is None:
            raise ClientError("closed")
        self.transport.write(data)

    # -- handshakes ---------------------------------------------------------------------------

    async def connect_tunnel(self, authority: bytes, session: str | None, header: str) -> None:
        extra = b"" if session is None else b"%s: %s\r\n" % (header.encode(), session.encode())
        self.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (authority, authority, extra))
        head = await self._read(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ClientError("bad_response")
        if parts[1] != b"200":
            raise ClientError(f"connect_{parts[1].decode()}")

    async def socks5(self, host: str, port: int) -> None:
        self.write(b"\x05\x01\x00")
        if await self._read(2) != b"\x05\x00":
            raise ClientError("socks_auth")
        try:
            address = b"\x01" + ipaddress.IPv4Address(host).packed
        except ValueError:
            address = b"\x03" + bytes([len(host)]) + host.encode()
        self.write(b"\x05\x01\x00" + address + port.to_bytes(2, "big"))
        reply = await self._read(4)
        if reply[1] != 0:
            raise ClientError(f"socks_{reply[1]:02x}")
        rest = {1: 4, 4: 16}.get(reply[3])
        if rest is None:
            rest = (await self._read(1))[0]
        await self._read(rest + 2)

    async def start_tls(self, context: ssl.SSLContext, host: str) -> None:
        assert self.transport is not None
        self.transport = cast(
            asyncio.Transport,
            await self._loop.start_tls(self.transport, self, context, server_hostname=host),
        )

    def start_http(self) -> None:
        """From here on, bytes are HTTP responses (bytes already read included)."""
        self._parser = httptools.HttpResponseParser(self)
        if self._buf:
            leftover = bytes(self._buf)
            self._buf.clear()
            self.data_received(leftover)

    # -- requests -----------------------------------------------------------------------------

    async def request(self, data: bytes, *, capture: bool = False) -> Response:
        self._status, self._length = 0, 0
        self._body = [] if capture else None
        waiter = self._arm()
        self.write(data)
        result = await waiter
        assert isinstance(result, Response)
        return result

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True


async def open_conn(plan: Plan, counters: Counters, session: str | None) -> Conn:
    """A connection ready for HTTP requests to the origin, by the plan's way."""
    loop = asyncio.get_running_loop()
    host, port = plan.proxy if plan.mode != "origin" else plan.origin
    transport, conn = await loop.create_connection(lambda: Conn(counters), host, port)
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if plan.mode == "connect":
            await conn.connect_tunnel(plan.authority, session, plan.session_header)
        elif plan.mode == "socks5":
            await conn.socks5(*plan.origin)
        if plan.tls and plan.mode != "http":
            assert plan.ssl_context is not None
            await conn.start_tls(plan.ssl_context, plan.origin[0])
        conn.start_http()
    except BaseException:
        conn.abort()
        raise
    return conn
