"""Host and port syntax shared by the HTTP and SOCKS parsers."""

from __future__ import annotations

import ipaddress
import re

__all__ = ["is_domain_bytes", "parse_port", "split_authority"]

# RFC 3986 reg-name narrowed to what resolvers accept. Percent-encoded names and IPvFuture are
# refused rather than half-supported. Labels cannot contain dots, so the pattern cannot backtrack.
_REG_NAME = re.compile(r"(?:[A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?")
_MAX_HOST = 255
# Printable ASCII without space: what a SOCKS domain may contain once NULs, controls, blanks and
# non-ASCII are refused.
_DOMAIN_BYTES = bytes(range(0x21, 0x7F))


def parse_port(text: str) -> int | None:
    """1..65535 written in ASCII digits, else None. Port 0 cannot be dialled, so it is refused."""
    if 0 < len(text) <= 5 and text.isascii() and text.isdigit():
        port = int(text)
        if 0 < port < 65536:
            return port
    return None


def _is_ipv6(host: str) -> bool:
    # A zone id ("%25eth0") names an interface of the client's host, meaningless to us.
    if "%" in host:
        return False
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def split_authority(authority: str, default_port: int | None) -> tuple[str, int] | None:
    """`host[:port]` or `[v6]:port` into (host without brackets, port); None when invalid.

    `default_port` None means the port is required (authority-form of CONNECT).
    """
    port_text: str | None
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            return None
        host = authority[1:close]
        if not _is_ipv6(host):
            return None
        rest = authority[close + 1 :]
        if not rest:
            port_text = None
        elif rest[0] == ":":
            port_text = rest[1:]
        else:
            return None
    else:
        host, colon, port_text = authority.partition(":")
        if not colon:
            port_text = None
        if len(host) > _MAX_HOST or _REG_NAME.fullmatch(host) is None:
            return None
    if not port_text:
        # RFC 3986 lets an empty port mean the scheme default; CONNECT has none.
        return None if default_port is None else (host, default_port)
    port = parse_port(port_text)
    return None if port is None else (host, port)


def is_domain_bytes(raw: bytes | bytearray) -> bool:
    """1..255 bytes of printable ASCII (no NUL, control, space or non-ASCII byte)."""
    return 0 < len(raw) <= _MAX_HOST and not raw.translate(None, _DOMAIN_BYTES)
