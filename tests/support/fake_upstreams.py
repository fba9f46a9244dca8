"""Upstream proxies of the tests' own, with faults on demand: `FakeHttpProxy`, `FakeSocks5Proxy`.

Both listen on loopback (port 0), dial targets from their `egress` address (so the origin sees
which upstream carried a request), dial loopback targets only, and record what they saw.

Faults live in `proxy.faults` (a `Faults`) and may be flipped at any time; each new connection
takes a snapshot of them when it is accepted. `await proxy.refuse()` closes the listening socket
(connecting gets ECONNREFUSED) and `await proxy.resume()` listens on the same port again.
`closed_port()` is a port with nothing listening at all.

When the real target refuses, `FakeHttpProxy` answers 502 and `FakeSocks5Proxy` replies 0x05,
like real proxies do; an unknown host name is 502 / 0x04 (host unreachable), a dial timeout
504 / 0x04, a non-loopback target 403 / 0x02 (not allowed by ruleset).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from tests.support.net import (
    ResetBudget,
    TcpServer,
    closed_port,
    drain_forever,
    is_loopback,
    peer_of,
    relay,
    send,
)

__all__ = [
    "DialError",
    "FakeHttpProxy",
    "FakeSocks5Proxy",
    "Faults",
    "ProxyRequest",
    "SocksReply",
    "SocksRequest",
    "closed_port",
]


@dataclass
class Faults:
    """What a fake upstream does wrong. Defaults: nothing.

    - `blackhole`: accept, read and discard, never answer, never close.
    - `reset_after`: after this many bytes relayed (both directions, after the handshake),
      reset the client connection (RST). 0 resets right after the handshake.
    - `connect_status` (HTTP only): answer every request, CONNECT or absolute-form, with this
      status instead of serving it (e.g. 407 or 502).
    - `slow`: wait this many seconds before the first answer (the CONNECT reply or the response
      for HTTP; the method-selection reply for SOCKS).
    - `reply_code` (SOCKS only): answer the CONNECT request with this SOCKS5 reply code without
      dialing (e.g. 0x05 refused, 0x04 host unreachable).
    - `times`: the faults hold for this many more connections, then all clear (None: until
      changed).
    """

    blackhole: bool = False
    reset_after: int | None = None
    connect_status: int | None = None
    slow: float = 0.0
    reply_code: int | None = None
    times: int | None = None


class DialError(Exception):
    """A target that could not be dialed, with what each kind of proxy answers for it."""

    def __init__(self, http_status: int, socks_reply: int, reason: str) -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.socks_reply = socks_reply


Recorded = TypeVar("Recorded")


class _FakeUpstream(TcpServer, Generic[Recorded]):
    """Shared parts: faults, credentials, egress, loopback-only dialing, recorded requests."""

    scheme = ""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        egress: str | None = None,
        auth: tuple[str, str] | None = None,
        hosts: dict[str, str] | None = None,
        dial_timeout: float = 5.0,
    ) -> None:
        super().__init__(host, port)
        if egress is not None and not is_loopback(egress):
            raise ValueError(f"egress must be a loopback address, not {egress!r}")
        self.egress = egress
        self.auth = auth
        #: Host names this proxy resolves (no DNS): name -> loopback ip.
        self.hosts = {"localhost": "127.0.0.1", **(hosts or {})}
        self.dial_timeout = dial_timeout
        self.faults = Faults()
        #: (host, port) of every target dialed, in order.
        self.dialed: list[tuple[str, int]] = []
        #: Every request received, in order.
        self.requests: list[Recorded] = []

    @property
    def url(self) -> str:
        """e.g. "socks5://user:pw@127.0.0.1:1080"; credentials only when `auth` is set."""
        userinfo = ""
        if self.auth is not None:
            userinfo = f"{quote(self.auth[0], safe='')}:{quote(self.auth[1], safe='')}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{userinfo}{host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return len(self.accepted)

    async def refuse(self) -> None:
        """Close the listening socket: connecting gets ECONNREFUSED until `resume()`."""
        await self.stop_listening()

    async def resume(self) -> None:
        """Listen on the same port again."""
        await self.start()

    def clear_faults(self) -> None:
        self.faults = Faults()

    def _take_faults(self) -> Faults:
        faults = dataclasses.replace(self.faults)
        if self.faults.times is not None:
            self.faults.times -= 1
            if self.faults.times <= 0:
                self.faults = Faults()
        return faults

    def _resolve(self, host: str) -> str:
        address = self.hosts.get(host.lower(), host).strip("[]")
        if is_loopback(address):
            return address
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        except OSError:
            raise DialError(502, 0x04, f"unknown host {host!r}") from None
        raise DialError(403, 0x02, f"{host!r} is not a loopback address")

    async def dial(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to a loopback target from the egress address; raises DialError."""
        address = self._resolve(host)
        local = None
        if self.egress is not None and (":" in self.egress) == (":" in address):
            local = (self.egress, 0)
        self.dialed.append((host, port))
        try:
            async with asyncio.timeout(self.dial_timeout):
                return await self.open_connection(address, port, local_addr=local)
        except ConnectionRefusedError:
            raise DialError(502, 0x05, f"{host}:{port} refused the connection") from None
        except TimeoutError:
            raise DialError(504, 0x04, f"{host}:{port} did not answer in time") from None
        except OSError as exc:
            socks = {errno.ENETUNREACH: 0x03, errno.EHOSTUNREACH: 0x04}.get(exc.errno or 0, 0x01)
            raise DialError(502, socks, f"{host}:{port}: {exc}") from None


# -- HTTP -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyRequest:
    """A request head as the fake HTTP proxy received it (before stripping anything)."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    peer: tuple[str, int]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
}


def _parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = raw.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _render_head(start_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [start_line, *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _without_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    drop = _HOP_BY_HOP | listed
    return [(name, value) for name, value in headers if name.lower() not in drop]


class FakeHttpProxy(_FakeUpstream[ProxyRequest]):
    """An HTTP proxy: CONNECT tunnels and absolute-form requests (one per connection).

    `requests` records each request head as received, so tests see which headers reached the
    upstream. With `auth`, a missing or wrong `Proxy-Authorization: Basic` gets 407.
    """

    scheme = "http"
    #: Fields added to every forwarded request, as a transparent proxy adds X-Forwarded-For.
    added_headers: tuple[tuple[str, str], ...] = ()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        faults = self._take_faults()
        if faults.blackhole:
            await drain_forever(reader)
            return
        start_line, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        method, target, version = [*start_line.split(" ", 2), "", ""][:3]
        request = ProxyRequest(method, target, version, headers, peer_of(writer))
        self.requests.append(request)
        if faults.slow:
            await asyncio.sleep(faults.slow)
        if not self._authorized(request):
            challenge = [("Proxy-Authenticate", 'Basic realm="fake-upstream"')]
            await self._respond(writer, request, 407, challenge)
        elif faults.connect_status is not None:
            await self._respond(writer, request, faults.connect_status)
        elif method == "CONNECT":
            await self._tunnel(reader, writer, request, ResetBudget(faults.reset_after))
        elif target.lower().startswith("http://"):
            await self._forward(reader, writer, request, ResetBudget(faults.reset_after))
        else:
            await self._respond(writer, request, 400)

    def _authorized(self, request: ProxyRequest) -> bool:
        if self.auth is None:
            return True
        scheme, _, credentials = (request.header("Proxy-Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except ValueError:
            return False
        return decoded == f"{self.auth[0]}:{self.auth[1]}"

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        request: ProxyRequest,
        status: int,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        """Answer `status` with a short body and Connection: close (the caller then closes)."""
        reason = _reason(status)
        body = f"{status} {reason} (fake upstream)\n".encode()
        headers = [
            *(extra or []),
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        writer.write(_render_head(f"HTTP/1.1 {status} {reason}", headers))
        if request.method != "HEAD":
            writer.write(body)
        await writer.drain()

    async def _dial_or_answer(
        self, writer: asyncio.StreamWriter, request: ProxyRequest, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await self.dial(host, port)
        except DialError as exc:
            await self._respond(writer, request, exc.http_status)
            return None

    async def _tunnel(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: ProxyRequest,
        budget: ResetBudget,
    ) -> None:
        host, _, port = request.target.rpartition(":")
        if not host or not port.isdigit():
            await self._respond(writer, request, 400)
            return
        target = await self._dial_or_answer(writer, request, host.strip("[]"), int(port))
        if target is None:
            return
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await relay((reader, writer), target, budget=budget)
        finally:
            await self.close_writer(target[1])

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: ProxyRequest,
        budget: ResetBudget,
    ) -> None:
        rest = request.target[len("http://") :]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path = rest[:cut], rest[cut:]
        if not path.startswith("/"):
            path = "/" + path
        host, _, port = authority.rpartition(":")
        if not host or not port.isdigit():
            host, port = authority, "80"
        target = await self._dial_or_answer(writer, request, host.strip("[]"), int(port))
        if target is None:
            return
        headers = _without_hop_by_hop(request.headers)
        if not any(name.lower() == "host" for name, _ in headers):
            headers.insert(0, ("Host", authority))
        headers.extend(self.added_headers)
        headers.append(("Connection", "close"))
        head = _render_head(f"{request.method} {path} {request.version}", headers)
        try:
            target[1].write(head)
            await target[1].drain()
            await relay(
                (reader, writer),
                target,
                budget=budget,
                downstream=self._relay_response(target[0], writer, budget),
            )
        finally:
            await self.close_writer(target[1])

    @staticmethod
    async def _relay_response(
        origin: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: ResetBudget
    ) -> None:
        """Relay the origin's response with `Connection: close`, until the origin closes."""
        while True:
            start_line, headers = _parse_head(await origin.readuntil(b"\r\n\r\n"))
            interim = start_line.split(" ", 2)[1:2] in (["100"], ["102"], ["103"])
            if not interim:
                headers = [*_without_hop_by_hop(headers), ("Connection", "close")]
            await send(writer, _render_head(start_line, headers), budget)
            if not interim:
                break
        while data := await origin.read(65536):
            await send(writer, data, budget)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# -- SOCKS5 ---------------------------------------------------------------------------------------


class SocksReply:
    """SOCKS5 reply codes (RFC 1928)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


@dataclass(frozen=True)
class SocksRequest:
    """A SOCKS5 request as received: target, address type (1 IPv4, 3 domain, 4 IPv6), user."""

    host: str
    port: int
    atyp: int
    command: int
    username: str | None
    peer: tuple[str, int] = field(default=("", 0))


class FakeSocks5Proxy(_FakeUpstream[SocksRequest]):
    """A SOCKS5 server: no auth, or RFC 1929 user/password when `auth` is set; CONNECT only."""

    scheme = "socks5"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        faults = self._take_faults()
        if faults.blackhole:
            await drain_forever(reader)
            return
        version, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        if version != 5:
            return
        if faults.slow:
            await asyncio.sleep(faults.slow)
        method = 0x02 if self.auth is not None else 0x00
        if method not in methods:
            writer.write(b"\x05\xff")
            await writer.drain()
            return
        writer.write(bytes([5, method]))
        username = None
        if self.auth is not None:
            _, length = await reader.readexactly(2)
            user = (await reader.readexactly(length)).decode("utf-8", "replace")
            password = (await reader.readexactly((await reader.readexactly(1))[0])).decode(
                "utf-8", "replace"
            )
            accepted = (user, password) == self.auth
            writer.write(b"\x01\x00" if accepted else b"\x01\x01")
            await writer.drain()
            if not accepted:
                return
            username = user
        _, command, _, atyp = await reader.readexactly(4)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        elif atyp == 3:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode("latin-1")
        else:
            await self._reply(writer, SocksReply.ADDRESS_TYPE_NOT_SUPPORTED)
            return
        port = int.from_bytes(await reader.readexactly(2), "big")
        self.requests.append(SocksRequest(host, port, atyp, command, username, peer_of(writer)))
        if command != 1:
            await self._reply(writer, SocksReply.COMMAND_NOT_SUPPORTED)
        elif faults.reply_code is not None:
            await self._reply(writer, faults.reply_code)
        else:
            await self._connect(reader, writer, host, port, ResetBudget(faults.reset_after))

    async def _connect(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        host: str,
        port: int,
        budget: ResetBudget,
    ) -> None:
        try:
            target = await self.dial(host, port)
        except DialError as exc:
            await self._reply(writer, exc.socks_reply)
            return
        try:
            await self._reply(writer, SocksReply.SUCCEEDED, target[1].get_extra_info("sockname"))
            await relay((reader, writer), target, budget=budget)
        finally:
            await self.close_writer(target[1])

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter, code: int, bound: tuple[Any, ...] | None = None
    ) -> None:
        address, port = ("0.0.0.0", 0) if bound is None else (str(bound[0]), int(bound[1]))
        if ":" in address:
            packed = b"\x04" + socket.inet_pton(socket.AF_INET6, address)
        else:
            packed = b"\x01" + socket.inet_pton(socket.AF_INET, address)
        writer.write(bytes([5, code, 0]) + packed + port.to_bytes(2, "big"))
        await writer.drain()
