"""Fault-injecting upstreams for the crash hunt: a TCP relay in front of an honest upstream.

A `ChaosRelay` listens on 127.0.0.1 and, per accepted connection, either relays bytes to its
honest backend (a simulated HTTP or SOCKS5 upstream) untouched, or injects one fault, chosen at
random (`FAULT_KINDS`):

- `reset_before`: read the gateway's first bytes (request head or SOCKS greeting), answer
  nothing, reset (RST);
- `reset_after_first`: relay to the backend, pass on the first byte of its answer, then reset;
- `blackhole`: accept and read, never answer, never close (the gateway's timeouts end it);
- `garbage`: answer the first bytes with bytes that are neither HTTP nor a SOCKS reply;
- `close_mid_body`: relay, but close (FIN) a few hundred bytes after the first response head
  has passed: a Content-Length announced and not delivered, or a tunnel cut mid-stream.

Working at the TCP level keeps one implementation for both protocols and leaves the backend's
protocol handling honest. A phase (`force`) makes every new connection take one kind for a
while; `refuse` closes the listening socket instead, so connecting gets ECONNREFUSED (the
kernel answers those, so they are counted per phase, not per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
from collections import Counter

__all__ = ["FAULT_KINDS", "ChaosRelay", "reset"]

FAULT_KINDS = ("reset_before", "reset_after_first", "blackhole", "garbage", "close_mid_body")
#: The longest a blackholed connection is held open: far beyond any gateway timeout of the hunt,
#: so the gateway is the one that gives up; bounded so that nothing outlives a run.
_BLACKHOLE_HOLD = 60.0
#: How long to wait for the gateway's first bytes before a fault that answers them.
_FIRST_BYTES_WAIT = 5.0
_CHUNK = 65536


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort with an RST (SO_LINGER 0), so the peer sees ECONNRESET rather than an end of file."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ChaosRelay:
    """A fault injector on 127.0.0.1 in front of `backend`; `counts` tallies what it did."""

    def __init__(
        self,
        name: str,
        backend: tuple[str, int],
        rng: random.Random,
        counts: Counter[str],
        *,
        fault_share: float = 0.55,
    ) -> None:
        self.name = name
        self.backend = backend
        self.rng = rng
        self.counts = counts
        self.fault_share = fault_share
        #: Set by a phase: every new connection takes this fault kind (None: chosen at random).
        self.force: str | None = None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, on the same port once one was given)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._accepted, "127.0.0.1", self.port)
            self.port = int(self._server.sockets[0].getsockname()[1])

    async def refuse(self) -> None:
        """Stop listening: connecting is refused until `start()`; open connections go on."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self) -> None:
        await self.refuse()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()

    def _choose(self) -> str | None:
        if self.force is not None:
            return self.force
        if self.rng.random() >= self.fault_share:
            return None
        return self.rng.choice(FAULT_KINDS)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault = self._choose()
        self.counts[fault or "relayed"] += 1
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._serve(fault, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, fault: str | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if fault == "reset_before":
                await asyncio.wait_for(reader.read(_CHUNK), _FIRST_BYTES_WAIT)
                reset(writer)
            elif fault == "blackhole":
                await asyncio.wait_for(_swallow(reader), _BLACKHOLE_HOLD)
            elif fault == "garbage":
                await asyncio.wait_for(reader.read(_CHUNK), _FIRST_BYTES_WAIT)
                writer.write(self._garbage())
                await writer.drain()
                await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            else:
                await self._relay(fault, reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    def _garbage(self) -> bytes:
        # Never a valid SOCKS5 version byte first, never "HTTP/" at the start.
        first = self.rng.choice((b"\x00", b"\x04\x5b", b"\xff\xfe", b"SSH-2.0-chaos\r\n"))
        return first + os.urandom(self.rng.randint(0, 64))

    async def _relay(
        self, fault: str | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        back_reader, back_writer = await asyncio.wait_for(
            asyncio.open_connection(*self.backend), _FIRST_BYTES_WAIT
        )
        up = asyncio.get_running_loop().create_task(_copy(reader, back_writer))
        try:
            await self._downstream(fault, back_reader, writer)
        finally:
            up.cancel()
            with contextlib.suppress(BaseException):
                await up
            back_writer.transport.abort()

    async def _downstream(
        self, fault: str | None, source: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The backend's answer to the gateway, cut as `fault` says."""
        if fault == "reset_after_first":
            first = await source.read(_CHUNK)
            if first:
                writer.write(first[:1])
                await writer.drain()
            reset(writer)
            return
        seen = bytearray()
        budget: int | None = None  # bytes still allowed through (close_mid_body)
        while data := await source.read(_CHUNK):
            if fault == "close_mid_body":
                if budget is None:
                    seen += data[:_CHUNK]
                    end = seen.find(b"\r\n\r\n")
                    if end >= 0:
                        allowed = end + 4 + self.rng.randint(1, 600)
                        budget = allowed - (len(seen) - len(data))
                if budget is not None:
                    data = data[: max(0, budget)]
                    budget -= len(data)
            if data:
                writer.write(data)
                await writer.drain()
            if budget is not None and budget <= 0:
                break  # the close in _serve ends it: a FIN after a short body
        if fault == "close_mid_body" and writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()


async def _swallow(reader: asyncio.StreamReader) -> None:
    """Read and drop until the peer closes."""
    while await reader.read(_CHUNK):
        pass


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
