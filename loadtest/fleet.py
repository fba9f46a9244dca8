"""A fleet of simulated upstream proxies (HTTP and SOCKS5) with toxiproxy-style faults.

Each upstream listens on its own loopback address (127.0.0.10, 127.0.0.11, ...) and dials
targets from that same address, so the origin sees which upstream carried a request. They are
written to stay out of the way of what is measured: protocols straight on the transports, no
copies on the relay path, flow control both ways, keep-alive to the origin.

- HTTP: CONNECT tunnels, and absolute-form requests (keep-alive; the request head is rewritten
  to origin form, the response is relayed as it comes, the origin connection is kept while the
  client asks for the same host).
- SOCKS5: no auth, or any user/password (RFC 1929); CONNECT to IPv4 or a domain name.

Only loopback targets are dialed (others: 403 / reply 0x02). Faults (`loadtest.toxics`) are
read when a connection is accepted and hold for its lifetime, as in toxiproxy; `down` closes
the listening socket and every open connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
from collections.abc import Callable
from typing import cast

from loadtest.toxics import Toxics

__all__ = ["SimUpstream", "egress_address"]

_MAX_HEAD = 64 * 1024
#: Shaped bytes waiting to be sent back above which the target side stops being read.
_HIGH, _LOW = 1 << 20, 256 * 1024
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_DROPPED_HEADERS = (b"proxy-connection:", b"proxy-authorization:")


def egress_address(index: int) -> str:
    """The loopback address upstream `index` listens on and leaves from."""
    return str(ipaddress.IPv4Address("127.0.0.10") + index)


class DialFailed(Exception):
    def __init__(self, http_status: int, socks_reply: int) -> None:
        super().__init__(http_status)
        self.http_status = http_status
        self.socks_reply = socks_reply


def _resolve(host: str) -> str:
    if host.lower() == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise DialFailed(502, 0x04) from None
    if not address.is_loopback or address.version != 4:
        raise DialFailed(403, 0x02)
    return str(address)


async def _dial(
    host: str, port: int, egress: str, factory: Callable[[], asyncio.Protocol], timeout: float
) -> asyncio.Transport:
    """Connect from `egress` (port chosen at connect time, so 4-tuples can share ports)."""
    loop = asyncio.get_running_loop()
    address = _resolve(host)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((egress, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (address, port))
        transport, _ = await loop.create_connection(factory, sock=sock)
        return transport
    except TimeoutError:
        sock.close()
        raise DialFailed(504, 0x04) from None
    except ConnectionRefusedError:
        sock.close()
        raise DialFailed(502, 0x05) from None
    except OSError:
        sock.close()
        raise DialFailed(502, 0x01) from None
    except BaseException:
        sock.close()
        raise


class _Shaper:
    """Sends data back later (latency, jitter), slower (bandwidth) or not all of it
    (limit_data), in order; tells its owner when too much is waiting."""

    __slots__ = (
        "_backlog",
        "_handles",
        "_last",
        "_loop",
        "_next_free",
        "_owner",
        "_rng",
        "_sent",
        "cut",
        "toxics",
    )

    def __init__(self, owner: _Conn, toxics: Toxics) -> None:
        self._owner = owner
        self._loop = owner.loop
        self.toxics = toxics
        self._rng = random.Random()
        self._last = 0.0
        self._next_free = 0.0
        self._backlog = 0
        self._sent = 0
        self._handles: set[asyncio.TimerHandle] = set()
        self.cut = False

    @property
    def pending(self) -> bool:
        return bool(self._handles)

    def push(self, data: bytes) -> None:
        toxics = self.toxics
        if toxics.limit_data is not None:
            room = max(0, toxics.limit_data - self._sent)
            if len(data) >= room:
                data, self.cut = data[:room], True
            self._sent += len(data)
        now = self._loop.time()
        delay = toxics.latency
        if toxics.jitter:
            delay += self._rng.uniform(-toxics.jitter, toxics.jitter)
        when = now + max(0.0, delay) / 1000.0
        if toxics.bandwidth:
            when = max(when, self._next_free)
            self._next_free = when + len(data) / (toxics.bandwidth * 1000.0)
        when = max(when, self._last + 1e-6)  # keeps the order
        self._last = when
        self._backlog += len(data)
        if self._backlog > _HIGH:
            self._owner.shaped_backlog(True)
        handle: asyncio.TimerHandle | None = None

        def deliver() -> None:
            assert handle is not None
            self._handles.discard(handle)
            self._backlog -= len(data)
            self._owner.deliver(data, last=self.cut and not self._handles)
            if self._backlog < _LOW:
                self._owner.shaped_backlog(False)

        handle = self._loop.call_at(when, deliver)
        self._handles.add(handle)

    def cancel(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()


class _TargetSide(asyncio.Protocol):
    """The connection to the target: everything it sends goes back through its owner."""

    __slots__ = ("owner", "transport")

    def __init__(self, owner: _Conn) -> None:
        self.owner: _Conn | None = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.down(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.target_closed(self)

    def pause_writing(self) -> None:
        if self.owner is not None and self.owner.transport is not None:
            self.owner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.owner is not None and self.owner.transport is not None:
            self.owner.transport.resume_reading()

    def detach(self) -> None:
        self.owner = None
        if self.transport is not None:
            self.transport.close()


class _Conn(asyncio.Protocol):
    """One client connection of a simulated upstream, HTTP proxy or SOCKS5."""

    def __init__(self, upstream: SimUpstream) -> None:
        self.upstream = upstream
        self.loop = upstream.loop
        self.toxics = upstream.toxics
        self.transport: asyncio.Transport | None = None
        self.target: _TargetSide | None = None
        self.authority = b""
        self.state = "head" if upstream.kind == "http" else "greet"
        self.buf = bytearray()
        self.body_left = 0
        self.shaper = _Shaper(self, self.toxics) if self.toxics.shapes else None
        self.dialing: asyncio.Task[None] | None = None
        self.closing = False
        self._timers: list[asyncio.TimerHandle] = []
        self._paused_by_shaper = False

    # -- client side events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        self.upstream.live.add(self)
        self.upstream.accepted += 1
        toxics = self.toxics
        if toxics.reset_peer is not None:
            self._timers.append(self.loop.call_later(toxics.reset_peer / 1000.0, self.reset))
        if toxics.timeout is not None:
            self.state = "blackhole"
            if toxics.timeout > 0:
                self._timers.append(self.loop.call_later(toxics.timeout / 1000.0, self.abort))

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == "tunnel":
            if self.target is not None and self.target.transport is not None:
                self.target.transport.write(data)
            return
        if state == "blackhole":
            return
        self.buf += data
        self._advance()

    def eof_received(self) -> bool:
        # A tunnel passes the half-close on; an HTTP client that stops sending is gone.
        target = self.target.transport if self.target is not None else None
        if self.state == "tunnel" and target is not None and target.can_write_eof():
            target.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream.live.discard(self)
        self.transport = None
        self.state = "closed"
        for timer in self._timers:
            timer.cancel()
        if self.shaper is not None:
            self.shaper.cancel()
        if self.dialing is not None and not self.dialing.done():
            self.dialing.cancel()
        if self.target is not None:
            target, self.target = self.target, None
            target.detach()

    def pause_writing(self) -> None:
        if self.target is not None and self.target.transport is not None:
            self.target.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._paused_by_shaper:
            return
        if self.target is not None and self.target.transport is not None:
            self.target.transport.resume_reading()

    # -- sending back -------------------------------------------------------------------------

    def down(self, data: bytes) -> None:
        if self.shaper is not None:
            if not self.shaper.cut:
                self.shaper.push(data)
                if self.shaper.cut and not self.shaper.pending:
                    self.close_soon()
        elif self.transport is not None:
            self.transport.write(data)

    def deliver(self, data: bytes, *, last: bool) -> None:
        """A shaped piece of data is due."""
        if self.transport is None:
            return
        if data:
            self.transport.write(data)
        if last:
            self.close_soon()
        elif self.closing and self.shaper is not None and not self.shaper.pending:
            self._close_after_delay()

    def shaped_backlog(self, too_much: bool) -> None:
        if too_much == self._paused_by_shaper:
            return
        self._paused_by_shaper = too_much
        target = self.target.transport if self.target is not None else None
        if target is not None:
            if too_much:
                target.pause_reading()
            else:
                target.resume_reading()

    def target_closed(self, target: _TargetSide) -> None:
        if target is self.target:
            self.target = None
            self.close_soon()

    def close_soon(self) -> None:
        """Close once shaped data has gone out, after `slow_close`."""
        if self.closing:
            return
        self.closing = True
        if self.shaper is not None and self.shaper.pending and not self.shaper.cut:
            return  # deliver() closes when the last piece has gone
        self._close_after_delay()

    def _close_after_delay(self) -> None:
        delay = self.toxics.slow_close / 1000.0
        if self.transport is None:
            return
        if delay:
            self._timers.append(self.loop.call_later(delay, self._close))
        else:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Abort with an RST (SO_LINGER 0): the client sees ECONNRESET."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # -- protocol steps -----------------------------------------------------------------------

    def _advance(self) -> None:
        while self.buf and self.state not in ("dialing", "tunnel", "blackhole", "closed"):
            step = self._http_step if self.upstream.kind == "http" else self._socks_step
            if not step():
                return

    def _http_step(self) -> bool:
        buf = self.buf
        if self.body_left:
            n = min(self.body_left, len(buf))
            if self.target is not None and self.target.transport is not None:
                self.target.transport.write(bytes(buf[:n]))
            del buf[:n]
            self.body_left -= n
            return True
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._http_fail(431)
            return False
        head = bytes(buf[:end])
        del buf[: end + 4]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self._http_fail(400)
            return False
        method, target, version = parts
        self.upstream.requests += 1
        if method == b"CONNECT":
            host, _, port = target.rpartition(b":")
            if not host or not port.isdigit():
                self._http_fail(400)
                return False
            self._dial(host.decode("latin-1").strip("[]"), int(port), self._tunnel_open)
            return False
        if target[:7].lower() != b"http://":
            self._http_fail(400)
            return False
        rest = target[7:]
        slash = rest.find(b"/")
        authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
        kept = [line for line in lines[1:] if not line[:20].lower().startswith(_DROPPED_HEADERS)]
        body = 0
        for line in kept:
            lowered = line[:18].lower()
            if lowered.startswith(b"content-length:"):
                body = int(line[15:].strip() or b"0")
            elif lowered.startswith(b"transfer-encoding"):
                self._http_fail(501)
                return False
        out = b"\r\n".join([b"%s %s %s" % (method, path, version), *kept]) + b"\r\n\r\n"
        if self.target is not None and self.authority == authority:
            if self.target.transport is not None:
                self.target.transport.write(out)
            self.body_left = body
            return True
        if self.target is not None:
            old, self.target = self.target, None
            old.detach()
        self.authority = authority
        host, _, port = authority.rpartition(b":")
        if not host or not port.isdigit():
            host, port = authority, b"80"

        def send_request() -> None:
            assert self.target is not None
            assert self.target.transport is not None
            self.target.transport.write(out)
            self.body_left = body
            self.state = "head"

        self._dial(host.decode("latin-1").strip("[]"), int(port), send_request)
        return False

    def _tunnel_open(self) -> None:
        if self.upstream.kind == "http":
            self.down(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            self.down(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        self.state = "tunnel"
        if self.buf and self.target is not None and self.target.transport is not None:
            self.target.transport.write(bytes(self.buf))
            self.buf.clear()

    def _http_fail(self, status: int) -> None:
        self.down(
            b"HTTP/1.1 %d Upstream Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status
        )
        self.state = "closed"
        self.close_soon()

    def _socks_step(self) -> bool:
        buf = self.buf
        if self.state == "greet":
            if len(buf) < 2 or len(buf) < 2 + buf[1]:
                return False
            if buf[0] != 5:
                self.abort()
                return False
            methods = bytes(buf[2 : 2 + buf[1]])
            del buf[: 2 + len(methods)]
            if 0 in methods:
                self.down(b"\x05\x00")
                self.state = "request"
            elif 2 in methods:
                self.down(b"\x05\x02")
                self.state = "auth"
            else:
                self.down(b"\x05\xff")
                self.state = "closed"
                self.close_soon()
            return True
        if self.state == "auth":
            if len(buf) < 2 or len(buf) < 3 + buf[1] or len(buf) < 3 + buf[1] + buf[2 + buf[1]]:
                return False
            del buf[: 3 + buf[1] + buf[2 + buf[1]]]
            self.down(b"\x01\x00")  # any user and password will do
            self.state = "request"
            return True
        # request: VER CMD RSV ATYP DST.ADDR DST.PORT
        if len(buf) < 5:
            return False
        atyp = buf[3]
        if atyp == 1:
            size = 4 + 4 + 2
        elif atyp == 3:
            size = 5 + buf[4] + 2
        else:
            self._socks_fail(0x08)
            return False
        if len(buf) < size:
            return False
        if atyp == 1:
            host = socket.inet_ntoa(bytes(buf[4:8]))
        else:
            host = bytes(buf[5 : 5 + buf[4]]).decode("latin-1")
        port = int.from_bytes(buf[size - 2 : size], "big")
        command = buf[1]
        del buf[:size]
        self.upstream.requests += 1
        if command != 1:
            self._socks_fail(0x07)
            return False
        self._dial(host, port, self._tunnel_open)
        return False

    def _socks_fail(self, code: int) -> None:
        self.down(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
        self.state = "closed"
        self.close_soon()

    def _dial(self, host: str, port: int, then: Callable[[], None]) -> None:
        self.state = "dialing"
        if self.transport is not None:
            self.transport.pause_reading()
        self.dialing = self.loop.create_task(self._dial_task(host, port, then), name="sim-dial")

    async def _dial_task(self, host: str, port: int, then: Callable[[], None]) -> None:
        upstream = self.upstream
        try:
            target = await _dial(
                host, port, upstream.host, lambda: _TargetSide(self), upstream.dial_timeout
            )
        except DialFailed as failure:
            if self.upstream.kind == "http":
                self._http_fail(failure.http_status)
            else:
                self._socks_fail(failure.socks_reply)
            return
        if self.transport is None:  # the client left meanwhile
            target.close()
            return
        protocol = target.get_protocol()
        assert isinstance(protocol, _TargetSide)
        self.target = protocol
        then()
        self.transport.resume_reading()
        self._advance()


class SimUpstream:
    """One simulated upstream proxy: `kind` "http" or "socks5", on and from `host`."""

    def __init__(self, index: int, kind: str, *, dial_timeout: float = 5.0) -> None:
        if kind not in ("http", "socks5"):
            raise ValueError(f"unknown upstream kind {kind!r}")
        self.index = index
        self.kind = kind
        self.host = egress_address(index)
        self.port = 0
        self.dial_timeout = dial_timeout
        self.toxics = Toxics()
        self.loop = asyncio.get_running_loop()
        self.live: set[_Conn] = set()
        self.accepted = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"{self.kind}://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await self.loop.create_server(
            lambda: _Conn(self), self.host, self.port, backlog=4096, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def apply(self, toxics: Toxics) -> None:
        """Take `toxics` for new connections; `down` also ends the open ones."""
        self.toxics = toxics
        if toxics.down and self._server is not None:
            self._server.close()
            self._server = None
            for conn in list(self.live):
                conn.abort()
        elif not toxics.down and self._server is None:
            await self.start()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.live):
            conn.abort()

    def stats(self) -> dict[str, int]:
        return {"accepted": self.accepted, "requests": self.requests, "open": len(self.live)}
