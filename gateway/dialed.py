"""What a dial hands over: a connection through an upstream, and how it reaches the target.

A module of its own, compiled with the request path (setup.py): every plain HTTP request reads
and updates the one it rides on (`gateway.dial` makes them; `gateway.upstream_connections`
lends them again)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.channel import Channel

__all__ = ["DialMode", "Dialed"]


class DialMode(StrEnum):
    #: Bytes written to the channel reach the target.
    TUNNEL = "tunnel"
    #: The channel talks to an HTTP proxy that expects absolute-form requests.
    FORWARD = "forward"


@dataclass(slots=True, init=False)
class Dialed:
    """A connection through an upstream, handshake done, its channel still in buffered mode."""

    channel: Channel
    #: Tunnel bytes that arrived with the handshake reply: send them on first.
    early: bytes
    mode: DialMode
    #: Seconds from the start of the dial to the end of the handshake (for the health EWMA).
    connect_latency: float
    #: Requests the connection carried before this one (a kept connection lent again).
    uses: int = 0

    # Written out: compiled, a dataclass's generated __init__ runs interpreted.
    def __init__(
        self, channel: Channel, early: bytes, mode: DialMode, connect_latency: float, uses: int = 0
    ) -> None:
        self.channel = channel
        self.early = early
        self.mode = mode
        self.connect_latency = connect_latency
        self.uses = uses
