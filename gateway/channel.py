"""`Channel`: one TCP connection as an `asyncio.Protocol`, owned by one reader at a time.

A channel starts in buffered mode: bytes collect in `buffer` and the owning coroutine awaits
`read_more()` (one wake-up per arrival, for parsing a request head or a handshake reply). It can
then be handed a *sink*, a plain function that receives every later chunk straight from
`data_received`: that is how relays and body streaming move data without a coroutine switch per
chunk. Flow control is the transport's own: when a peer cannot keep up, `pause_reading()` here
(see `gateway.relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Final, cast

from gateway.errors import ChannelClosed

__all__ = ["BUFFER_LIMIT", "CLOSE_GRACE", "AcceptedChannel", "Channel", "ChannelClosed"]

#: Bytes a channel buffers for a reader that is not reading before it stops reading the socket.
BUFFER_LIMIT: Final = 256 * 1024
#: Seconds a closing channel waits for its peer to take the bytes still buffered for it.
CLOSE_GRACE: Final = 30.0

Sink = Callable[[bytes], None]
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


def _transports_with_nodelay() -> frozenset[type]:
    """Transport types that set TCP_NODELAY themselves (uvloop's TCP): asking for their
    socket and setting it again would cost an object and a system call per connection."""
    try:
        uvloop_loop = importlib.import_module("uvloop.loop")
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return frozenset()
    tcp = getattr(uvloop_loop, "TCPTransport", None)
    return frozenset() if tcp is None else frozenset({tcp})


_NODELAY_BY_DEFAULT: Final = _transports_with_nodelay()


class Channel(asyncio.Protocol):
    __slots__ = (
        "_drain_waiter",
        "_on_eof",
        "_on_lost",
        "_on_pause_writing",
        "_on_resume_writing",
        "_paused",
        "_read_waiter",
        "_reading_paused",
        "_sink",
        "buffer",
        "closed",
        "eof",
        "error",
        "loop",
        "transport",
        "write_paused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.error: BaseException | None = None
        self.write_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        #: Reading paused by `pause_reading` (flow control), until `resume_reading`.
        self._paused = False
        self._sink: Sink | None = None
        self._on_eof: Callable[[], None] | None = None
        self._on_lost: Callable[[BaseException | None], None] | None = None
        self._on_pause_writing: Callable[[], None] | None = None
        self._on_resume_writing: Callable[[], None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        if type(transport) in _NODELAY_BY_DEFAULT:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Proxied traffic is latency-bound: small writes must not wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink(data)
            return
        self.buffer += data
        if len(self.buffer) > BUFFER_LIMIT and not self._reading_paused:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        if self._on_eof is not None:
            self._on_eof()
        self._wake_reader()
        # Keep our sending side open: EOF is one direction ending (half-close). TLS cannot
        # half-close, and asyncio says so in the log if asked to.
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.eof = True
        self.error = exc
        self._wake_reader()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._on_lost is not None:
            self._on_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._on_pause_writing is not None:
            self._on_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._on_resume_writing is not None:
            self._on_resume_writing()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading ------------------------------------------------------------------------------

    async def read_more(self, timeout: float | None = None) -> None:
        """Wait until bytes beyond those in `buffer` arrive. ChannelClosed at EOF;
        TimeoutError when nothing came within `timeout` seconds.

        A timer on the one future is much cheaper than `asyncio.timeout()`, and this is
        awaited once per request."""
        if self.eof:
            raise ChannelClosed("connection closed by peer")
        if self._reading_paused:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        waiter = self._read_waiter = self.loop.create_future()
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self._read_waiter = None
            if timer is not None:
                timer.cancel()
        if self.eof and not self.buffer:
            raise ChannelClosed("connection closed by peer")

    def take_buffer(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        if self._reading_paused:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    def set_sink(
        self,
        sink: Sink | None,
        *,
        on_eof: Callable[[], None] | None = None,
        on_lost: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        """Route every later chunk to `sink` (None returns to buffered mode).

        Bytes already buffered stay in `buffer`: the caller hands them on first.
        """
        self._sink = sink
        self._on_eof = on_eof
        self._on_lost = on_lost

    def on_write_pressure(
        self, pause: Callable[[], None] | None, resume: Callable[[], None] | None
    ) -> None:
        """Called when our outgoing buffer fills up and drains (to pause a peer's reading)."""
        self._on_pause_writing = pause
        self._on_resume_writing = resume

    def limit_buffer(self, high: int) -> None:
        """Hold up to `high` outgoing bytes before `on_write_pressure` pauses the peer."""
        if self.transport is not None and not self.closed:
            self.transport.set_write_buffer_limits(high=high)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again after `pause_reading`, or after a buffer that filled up (a call made
        for every connection kept for reuse: one that reads already costs nothing)."""
        if (self._paused or self._reading_paused) and self.transport is not None:
            self._paused = self._reading_paused = False
            if not self.closed:
                self.transport.resume_reading()

    # -- writing ------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_all(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Write `pieces` in one go (one system call where the transport can)."""
        if self.transport is not None and not self.closed:
            self.transport.writelines(pieces)

    async def drain(self) -> None:
        """Wait while the outgoing buffer is above the transport's high-water mark."""
        if not self.write_paused or self.closed:
            return
        waiter = self._drain_waiter = self.loop.create_future()
        await waiter

    def write_eof(self) -> None:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()  # TLS cannot half-close: flush and close instead

    def close(self) -> None:
        """Close after flushing what is buffered; a peer that will not read it for
        `CLOSE_GRACE` seconds is cut off, so a socket never outlives its use for long."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size():
            self.loop.call_later(CLOSE_GRACE, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Close with a TCP RST, so the peer sees a reset and not a clean end of stream."""
        if self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        self.transport.abort()

    @property
    def peer(self) -> tuple[str, int] | None:
        if self.transport is None:
            return None
        peername = self.transport.get_extra_info("peername")
        return None if peername is None else (peername[0], peername[1])

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AcceptedChannel(Channel):
    """A connection a listener accepted: `on_open` serves it as soon as its transport exists,
    `on_close` hears that it is gone."""

    __slots__ = ("_on_close", "_on_open")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_open: Callable[[Channel], None],
        on_close: Callable[[Channel], None],
    ) -> None:
        super().__init__(loop)
        self._on_open = on_open
        self._on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_open(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._on_close(self)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
