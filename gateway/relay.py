"""Splice two channels into a tunnel: both directions at once, no coroutine per chunk.

Each side's `data_received` writes straight into the other side's transport. When a transport's
outgoing buffer passes its high-water mark, the side feeding it stops reading until it drains:
memory stays bounded whatever the speed difference. EOF one way becomes `write_eof` the other
way (half-close); the tunnel ends when both ways have ended, when either side is lost, or when
no byte has moved for `idle_timeout`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum

from gateway.channel import Channel

__all__ = ["BUFFER_LIMIT", "RelayEnd", "RelayResult", "relay"]

#: Bytes a side may hold for its peer before the other side stops reading. uvloop reads up to
#: 256 KB at a time, so at the transports' default mark (64 KiB) a single read the peer could
#: not take at once paused reading after nearly every read, and each pause and resume woke the
#: far end once more: bulk CONNECT tunnels moved 0.87-0.90 of the bytes a client gets straight
#: from the upstream, 0.89-0.93 with this mark (runs alternating the two). Memory stays bounded:
#: at most this much (plus one read) per direction, and only while a peer is the slower side.
BUFFER_LIMIT = 256 * 1024


class RelayEnd(StrEnum):
    CLOSED = "closed"  # both directions finished
    LOST = "lost"  # a side reset or vanished
    IDLE = "idle"  # nothing moved for idle_timeout
    CANCELLED = "cancelled"  # shutdown


@dataclass(slots=True, frozen=True)
class RelayResult:
    #: Bytes from the client side to the upstream side.
    sent: int
    #: Bytes from the upstream side to the client side.
    received: int
    end: RelayEnd
    #: The upstream side broke off (a reset, or an error on its socket) before the tunnel
    #: ended otherwise: held against the upstream's health.
    upstream_broke: bool = False


class _Tunnel:
    __slots__ = (
        "client",
        "client_eof",
        "done",
        "end",
        "finished",
        "idle_timeout",
        "idle_timer",
        "last_total",
        "quiet_checks",
        "received",
        "sent",
        "upstream",
        "upstream_broke",
        "upstream_eof",
    )

    def __init__(self, client: Channel, upstream: Channel, idle_timeout: float) -> None:
        self.client = client
        self.upstream = upstream
        self.sent = 0
        self.received = 0
        self.client_eof = False
        self.upstream_eof = False
        self.end = RelayEnd.CLOSED
        self.upstream_broke = False
        self.finished = False
        # Not a "finished" flag: cancelling the awaiting task cancels this future first.
        self.done: asyncio.Future[None] = client.loop.create_future()
        self.idle_timeout = idle_timeout
        self.last_total = -1
        self.quiet_checks = 0
        self.idle_timer: asyncio.TimerHandle | None = None

    def start(self, client_early: bytes, upstream_early: bytes) -> None:
        client, upstream = self.client, self.upstream
        client.set_sink(self.from_client, on_eof=self.client_ended, on_lost=self.client_lost)
        upstream.set_sink(
            self.from_upstream, on_eof=self.upstream_ended, on_lost=self.upstream_lost
        )
        client.limit_buffer(BUFFER_LIMIT)
        upstream.limit_buffer(BUFFER_LIMIT)
        client.on_write_pressure(upstream.pause_reading, upstream.resume_reading)
        upstream.on_write_pressure(client.pause_reading, client.resume_reading)
        if client_early:
            self.from_client(client_early)
        if upstream_early:
            self.from_upstream(upstream_early)
        if client.closed:
            self.client_lost(client.error)
        elif upstream.closed:
            self.upstream_lost(upstream.error)
        if self.finished:
            return
        if client.eof:
            self.client_ended()
        if upstream.eof:
            self.upstream_ended()
        # Sinks may have been paused for buffering before the splice: read freely now.
        client.resume_reading()
        upstream.resume_reading()
        # Four checks per idle period: a tunnel idles out between 1 and 1.25 periods.
        self.idle_timer = client.loop.call_later(self.idle_timeout / 4, self.check_idle)

    def from_client(self, data: bytes) -> None:
        self.sent += len(data)
        self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.received += len(data)
        self.client.write(data)

    def client_ended(self) -> None:
        if not self.client_eof:
            self.client_eof = True
            self.upstream.write_eof()
            self.maybe_finish()

    def upstream_ended(self) -> None:
        if not self.upstream_eof:
            self.upstream_eof = True
            self.client.write_eof()
            self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.client_eof and self.upstream_eof:
            self.finish(RelayEnd.CLOSED)

    def client_lost(self, exc: BaseException | None) -> None:
        self.lost(exc, self.upstream)

    def upstream_lost(self, exc: BaseException | None) -> None:
        if exc is not None and not self.finished:
            self.upstream_broke = True
        self.lost(exc, self.client)

    def lost(self, exc: BaseException | None, other: Channel) -> None:
        if self.finished:
            return
        if exc is not None:
            # Pass a reset on as a reset: a clean close would pass a cut-off stream as whole.
            other.reset()
        both_ended = self.client_eof and self.upstream_eof
        self.finish(RelayEnd.CLOSED if exc is None and both_ended else RelayEnd.LOST)

    def check_idle(self) -> None:
        total = self.sent + self.received
        if total != self.last_total:
            self.last_total = total
            self.quiet_checks = 0
        else:
            self.quiet_checks += 1
            if self.quiet_checks >= 4:
                self.finish(RelayEnd.IDLE)
                return
        self.idle_timer = self.client.loop.call_later(self.idle_timeout / 4, self.check_idle)

    def finish(self, end: RelayEnd) -> None:
        if self.finished:
            return
        self.finished = True
        self.end = end
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        for side in (self.client, self.upstream):
            side.set_sink(None)
            side.on_write_pressure(None, None)
            if end is RelayEnd.CLOSED:
                side.close()  # both ways ended: deliver what is still buffered
            else:
                side.abort()  # idle, broken or shut down: nobody waits for the rest
        if not self.done.done():
            self.done.set_result(None)


async def relay(
    client: Channel,
    upstream: Channel,
    *,
    idle_timeout: float,
    client_early: bytes = b"",
    upstream_early: bytes = b"",
) -> RelayResult:
    """Carry bytes both ways until the tunnel ends; both channels are closed on return.

    `client_early` / `upstream_early` are bytes already read from either side (pipelined after
    a CONNECT, or arrived with the upstream's handshake reply): they go first, nothing is lost.
    """
    tunnel = _Tunnel(client, upstream, idle_timeout)
    tunnel.start(client_early + client.take_buffer(), upstream_early + upstream.take_buffer())
    try:
        await tunnel.done
    except asyncio.CancelledError:
        tunnel.finish(RelayEnd.CANCELLED)
        raise
    return RelayResult(tunnel.sent, tunnel.received, tunnel.end, tunnel.upstream_broke)
