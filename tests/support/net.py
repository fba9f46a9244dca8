"""Socket plumbing shared by the rig's servers: loopback checks, ports, a TCP server base, relays.

Every server of the rig derives from `TcpServer`, which owns its listening socket, each
connection's handler task and every stream writer it opened, so `close()` leaves nothing behind
(no pending task, no unclosed transport) even while connections are blackholed mid-request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Coroutine
from typing import Any, Self

log = logging.getLogger(__name__)

#: Bytes read at once by relays and drains.
CHUNK = 65536


def is_loopback(host: str) -> bool:
    """Whether `host` is a literal loopback address (127.0.0.0/8 or ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on `host` with nothing listening: connecting to it gets ECONNREFUSED.

    The port was just bound and released, so nothing else holds it; the kernel does not hand the
    same ephemeral port out again right away.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


#: A port for a subprocess to listen on (same mechanism; the name says what it is for).
free_port = closed_port


def set_reset_on_close(writer: asyncio.StreamWriter) -> None:
    """Make closing `writer`'s socket send an RST instead of a FIN (SO_LINGER with timeout 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with an RST: the peer's next read or write gets ECONNRESET."""
    set_reset_on_close(writer)
    writer.transport.abort()


def peer_of(writer: asyncio.StreamWriter) -> tuple[str, int]:
    """The (host, port) of the far end of `writer`'s connection."""
    peer = writer.get_extra_info("peername")
    return (str(peer[0]), int(peer[1]))


class ResetBudget:
    """Counts bytes relayed on one connection; says when `limit` is reached (None: never)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.relayed = 0

    def allow(self, size: int) -> int:
        """How many of the next `size` bytes may still pass before the reset."""
        if self.limit is None:
            return size
        allowed = max(0, min(size, self.limit - self.relayed))
        self.relayed += allowed
        return allowed

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.relayed >= self.limit


class ResetNow(Exception):
    """Raised inside a relay when its `ResetBudget` runs out."""


async def send(writer: asyncio.StreamWriter, data: bytes, budget: ResetBudget | None) -> None:
    """Write `data` (as far as `budget` allows) and drain; raise ResetNow once it runs out."""
    if budget is None:
        writer.write(data)
        await writer.drain()
        return
    allowed = budget.allow(len(data))
    if allowed:
        writer.write(data[:allowed])
        await writer.drain()
    if budget.exhausted:
        raise ResetNow


async def pipe(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, budget: ResetBudget | None = None
) -> None:
    """Copy `src` to `dst` until EOF, then half-close `dst` (write EOF)."""
    if budget is not None and budget.exhausted:
        raise ResetNow
    while data := await src.read(CHUNK):
        await send(dst, data, budget)
    if dst.can_write_eof() and not dst.is_closing():
        with contextlib.suppress(OSError):
            dst.write_eof()


async def relay(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    budget: ResetBudget | None = None,
    downstream: Coroutine[Any, Any, None] | None = None,
) -> None:
    """Relay both ways with half-close until both directions hit EOF.

    `downstream` replaces the plain target-to-client copy (an HTTP response relay that ends the
    exchange when it returns: then the client-to-target copy is dropped). When `budget` runs out
    the client connection is reset (RST). An error on either side aborts both. The caller still
    closes both writers.
    """
    (client_reader, client_writer), (target_reader, target_writer) = client, target
    upstream = asyncio.create_task(pipe(client_reader, target_writer, budget))
    custom = downstream is not None
    if downstream is None:
        downstream = pipe(target_reader, client_writer, budget)
    down = asyncio.create_task(downstream)
    tasks = {upstream, down}
    try:
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises ResetNow / connection errors
            if custom and down.done():
                break
    except ResetNow:
        reset(client_writer)
        target_writer.transport.abort()
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        client_writer.transport.abort()
        target_writer.transport.abort()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TcpServer:
    """An asyncio TCP server on `host`, port 0 unless given, that tracks and cleans up after itself.

    Subclasses implement `handle(reader, writer)`. Writers of outgoing connections a handler
    opens go through `open_connection` so `close()` closes them too.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if not is_loopback(host):
            raise ValueError(f"the rig listens on loopback only, not {host!r}")
        self.host = host
        self.port = port
        self._servers: list[asyncio.Server] = []
        self._listening: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: Peer (host, port) of every accepted connection, in order.
        self.accepted: list[tuple[str, int]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Self:
        """Listen (again, on the same port once one was assigned)."""
        if self._listening is not None:
            return self
        server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self._listening = server
        self._servers.append(server)
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    async def stop_listening(self) -> None:
        """Close the listening socket: new connections get ECONNREFUSED; open ones go on."""
        if self._listening is not None:
            self._listening.close()
            self._listening = None

    async def close(self) -> None:
        """Stop listening, end every connection and handler, and wait until all is closed."""
        await self.stop_listening()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            await close_writer(writer)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- connections ----------------------------------------------------------------------

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.accepted.append(peer_of(writer))
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handle(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.transport.abort()
        except Exception:
            log.exception("%s: handler failed", type(self).__name__)
            writer.transport.abort()
        finally:
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._writers.discard(writer)

    async def open_connection(
        self, host: str, port: int, *, local_addr: tuple[str, int] | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Dial a loopback target; the writer is closed by `close_writer` or `close()`."""
        if not is_loopback(host):
            raise PermissionError(f"the rig dials loopback only, not {host!r}")
        reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr)
        self._writers.add(writer)
        return reader, writer

    async def close_writer(self, writer: asyncio.StreamWriter) -> None:
        await close_writer(writer)
        self._writers.discard(writer)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close `writer` and wait until its transport is gone, ignoring connection errors."""
    if not writer.is_closing():
        writer.close()
    try:
        await writer.wait_closed()
    except asyncio.CancelledError:
        # A cancelled handler that was awaiting the same close waiter cancels it for everyone;
        # only our own cancellation is worth passing on.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:
        pass


async def drain_forever(reader: asyncio.StreamReader) -> None:
    """Read and discard until EOF, then wait forever (a blackhole never closes by itself)."""
    while await reader.read(CHUNK):
        pass
    await asyncio.Event().wait()
