"""SOCKS4 and SOCKS4a server side, sans-IO.

The request is VN=4, CD=1 (CONNECT), DSTPORT, DSTIP, USERID, NUL; a DSTIP of 0.0.0.x with
x != 0 announces SOCKS4a, and a NUL-terminated domain name follows. BIND is refused. The user id
and the domain name are capped at 255 bytes each; the user id is decoded as UTF-8 and the domain
must be printable ASCII.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.protocols._hosts import is_domain_bytes
from gateway.protocols._socks import EARLY_DATA_LIMIT, SocksProtocolError

__all__ = ["Socks4Connect", "Socks4Server", "SocksProtocolError"]

_VERSION = 0x04
_CMD_CONNECT = 0x01
_CMD_BIND = 0x02
_REJECTED = 0x5B
_MAX_FIELD = 255
# The reply's DSTPORT and DSTIP are ignored by CONNECT clients; zeros reveal nothing.
_GRANTED_REPLY = b"\x00\x5a" + bytes(6)
_REJECTED_REPLY = b"\x00\x5b" + bytes(6)


@dataclass(slots=True, frozen=True)
class Socks4Connect:
    """A CONNECT request: dotted IPv4, or the SOCKS4a domain name as sent."""

    host: str
    port: int
    userid: str
    is_4a: bool


def _error(message: str) -> SocksProtocolError:
    return SocksProtocolError(message, _REJECTED, _REJECTED_REPLY)


class Socks4Server:
    """One client connection's SOCKS4/4a request."""

    __slots__ = ("_buf", "_done", "_error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: SocksProtocolError | None = None
        self._done = False

    def feed(self, data: bytes | bytearray) -> list[Socks4Connect]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self._done:
            if len(buf) + len(data) > EARLY_DATA_LIMIT:
                raise self._fail(_error("too much early data"))
            buf += data
            return []
        buf += data
        if not buf:
            return []
        try:
            event = self._parse(buf)
        except SocksProtocolError as exc:
            raise self._fail(exc) from None
        return [] if event is None else [event]

    def reply(self, granted: bool) -> bytes:
        """The 8-byte answer: 0x5A granted, 0x5B rejected (then close)."""
        if not self._done:
            raise RuntimeError("no request to answer")
        return _GRANTED_REPLY if granted else _REJECTED_REPLY

    def take_buffered(self) -> bytes:
        """Bytes received after the request (the start of the tunnel); clears them."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def _fail(self, exc: SocksProtocolError) -> SocksProtocolError:
        self._error = exc
        self._buf.clear()
        return exc

    def _parse(self, buf: bytearray) -> Socks4Connect | None:
        n = len(buf)
        if buf[0] != _VERSION:
            raise _error("not a SOCKS4 request")
        if n < 2:
            return None
        if buf[1] != _CMD_CONNECT:
            raise _error("BIND is not supported" if buf[1] == _CMD_BIND else "unknown command")
        if n < 9:  # eight fixed bytes and at least the user id's NUL
            return None
        nul = buf.find(0, 8, 9 + _MAX_FIELD)
        if nul < 0:
            if n - 8 > _MAX_FIELD:
                raise _error("user id too long")
            return None
        end = nul + 1
        is_4a = buf[4] == buf[5] == buf[6] == 0 and buf[7] != 0
        if is_4a:
            domain_nul = buf.find(0, end, end + _MAX_FIELD + 1)
            if domain_nul < 0:
                if n - end > _MAX_FIELD:
                    raise _error("domain name too long")
                return None
            raw = buf[end:domain_nul]
            if not is_domain_bytes(raw):
                raise _error("invalid domain name")
            host = raw.decode("ascii")
            end = domain_nul + 1
        else:
            host = f"{buf[4]}.{buf[5]}.{buf[6]}.{buf[7]}"
        try:
            userid = buf[8:nul].decode()
        except UnicodeDecodeError:
            raise _error("user id is not UTF-8") from None
        port = buf[2] << 8 | buf[3]
        del buf[:end]
        self._done = True
        return Socks4Connect(host, port, userid, is_4a)
