"""What the SOCKS4 and SOCKS5 servers share."""

from __future__ import annotations

__all__ = ["EARLY_DATA_LIMIT", "SocksProtocolError"]

#: Most bytes a SOCKS parser holds after the request, before the driver takes them.
EARLY_DATA_LIMIT = 65536


class SocksProtocolError(Exception):
    """The client broke SOCKS. Send `reply` (may be empty) and close.

    `reply_code` is the code inside `reply`: the SOCKS5 REP byte (0x01 general failure, 0x07
    command not supported, 0x08 address type not supported), 0xFF for a SOCKS5 greeting with no
    acceptable method, 0x01 for a bad RFC 1929 sub-negotiation, 0x5B for SOCKS4. Messages never
    contain credentials.
    """

    def __init__(self, message: str, reply_code: int, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply_code = reply_code
        self.reply = reply

    def __repr__(self) -> str:
        return f"SocksProtocolError({self.args[0]!r}, reply_code={self.reply_code:#04x})"
