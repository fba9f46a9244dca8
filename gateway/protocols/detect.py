"""Which protocol a client speaks, from the first byte it sends."""

from __future__ import annotations

import enum

__all__ = ["Protocol", "detect_protocol"]


class Protocol(enum.Enum):
    """Values are the version bytes that select SOCKS; HTTP has no such byte."""

    SOCKS4 = 0x04
    SOCKS5 = 0x05
    HTTP = 0x00


def detect_protocol(first_byte: int) -> Protocol:
    """SOCKS4 and SOCKS5 start with their version byte; anything else is taken as HTTP (a method
    name), and the HTTP parser rejects it if it is not."""
    if first_byte == 0x05:
        return Protocol.SOCKS5
    if first_byte == 0x04:
        return Protocol.SOCKS4
    return Protocol.HTTP
