"""SOCKS5 server side (RFC 1928) with username/password authentication (RFC 1929), sans-IO.

`feed()` returns events in order: `Socks5MethodSelected` (send its `reply`), then `Socks5Auth`
when method 0x02 was chosen (answer with `auth_reply(ok)`), then `Socks5Connect` (dial, then
answer with `reply(code, ...)`). Pipelined messages are all parsed, so a driver that checks
credentials asynchronously must finish with `Socks5Auth` before acting on `Socks5Connect`;
`reply(SUCCEEDED)` refuses to run before a successful `auth_reply`. After the request, the bytes
the client sent ahead are in `take_buffered()`: they are tunnel data.

Domain names must be 1..255 bytes of printable ASCII (no NUL, control, space or non-ASCII
byte; IDNs arrive as punycode); anything else is refused with 0x01 general failure, since 0x08
would tell the client that domain names are not supported at all.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from gateway.protocols._hosts import is_domain_bytes
from gateway.protocols._socks import EARLY_DATA_LIMIT, SocksProtocolError

__all__ = [
    "AddressType",
    "Socks5Auth",
    "Socks5Connect",
    "Socks5Event",
    "Socks5MethodSelected",
    "Socks5Reply",
    "Socks5Server",
    "SocksProtocolError",
]

_VERSION = 0x05
_AUTH_VERSION = 0x01
_NO_AUTH = 0x00
_USER_PASS = 0x02
_NO_ACCEPTABLE = 0xFF
_CMD_CONNECT = 0x01

_NO_METHOD_REPLY = b"\x05\xff"
_AUTH_FAILURE_REPLY = b"\x01\x01"


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Socks5Reply(enum.IntEnum):
    """RFC 1928 §6 REP codes, for `Socks5Server.reply`."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


@dataclass(slots=True, frozen=True)
class Socks5MethodSelected:
    """The method chosen from the greeting; `reply` is the 2-byte answer to send."""

    method: int
    reply: bytes


@dataclass(slots=True, frozen=True)
class Socks5Auth:
    """RFC 1929 credentials, decoded as UTF-8. The password stays out of `repr`."""

    username: str
    password: str = field(repr=False)


@dataclass(slots=True, frozen=True)
class Socks5Connect:
    """A CONNECT request: dotted IPv4, compressed IPv6, or the domain name as sent."""

    host: str
    port: int
    address_type: AddressType


Socks5Event: TypeAlias = Socks5MethodSelected | Socks5Auth | Socks5Connect

_Auth = enum.Enum("_Auth", "NONE PENDING OK FAILED")


def _reply(code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        raw = bind_host.encode("ascii")
        if not 0 < len(raw) < 256:
            raise ValueError("bind host must be an IP address or a 1..255 byte name") from None
        address = bytes((AddressType.DOMAIN, len(raw))) + raw
    else:
        kind = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
        address = bytes((kind,)) + ip.packed
    return bytes((_VERSION, code, 0x00)) + address + bind_port.to_bytes(2, "big")


# Every reply the gateway sends has the same 0.0.0.0:0 bind address (it never exposes its own).
_DEFAULT_REPLIES = tuple(_reply(code) for code in range(256))

_State = Callable[["Socks5Server", list[Socks5Event]], bool]


class Socks5Server:
    """One client connection's SOCKS5 negotiation.

    With `auth_required`, method 0x02 is the only one accepted. Without it, 0x02 is still
    chosen whenever offered, and the credentials passed up: a client only offers them when it
    has some, and the username may carry routing parameters. Otherwise 0x00.
    """

    __slots__ = ("_auth", "_auth_required", "_buf", "_error", "_method", "_state")

    def __init__(self, auth_required: bool) -> None:
        self._auth_required = auth_required
        self._buf = bytearray()
        self._error: SocksProtocolError | None = None
        self._method = _NO_ACCEPTABLE
        self._auth = _Auth.NONE
        self._state: _State = Socks5Server._greeting

    def feed(self, data: bytes | bytearray) -> list[Socks5Event]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        out: list[Socks5Event] = []
        if self._state is Socks5Server._hold:
            if len(buf) + len(data) > EARLY_DATA_LIMIT:
                raise self._fail(SocksProtocolError("too much early data", 0x01))
            buf += data
            return out
        buf += data
        try:
            while buf and self._state(self, out):
                pass
        except SocksProtocolError as exc:
            raise self._fail(exc) from None
        return out

    def auth_reply(self, ok: bool) -> bytes:
        """The RFC 1929 answer to the `Socks5Auth` event. Close the connection after a failure."""
        if self._auth is not _Auth.PENDING:
            raise RuntimeError("no credentials are waiting for a verdict")
        if ok:
            self._auth = _Auth.OK
            return b"\x01\x00"
        self._auth = _Auth.FAILED
        self._fail(SocksProtocolError("authentication failed", 0x01))
        return _AUTH_FAILURE_REPLY

    def reply(self, code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
        """The answer to `Socks5Connect`: 0x00 success, 0x01..0x08 failures (see Socks5Reply)."""
        if self._state is not Socks5Server._hold:
            raise RuntimeError("no request to answer")
        if not 0 <= code <= 0xFF:
            raise ValueError("reply code must be a byte")
        if (
            code == Socks5Reply.SUCCEEDED
            and self._method == _USER_PASS
            and (self._auth is not _Auth.OK)
        ):
            raise RuntimeError("success reply before the credentials were accepted")
        if bind_host == "0.0.0.0" and bind_port == 0:
            return _DEFAULT_REPLIES[code]
        return _reply(code, bind_host, bind_port)

    def take_buffered(self) -> bytes:
        """Bytes received after the request (the start of the tunnel); clears them."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def _fail(self, exc: SocksProtocolError) -> SocksProtocolError:
        self._error = exc
        self._buf.clear()
        return exc

    # Each state parses one message from the buffer: False when more bytes are needed.

    def _greeting(self, out: list[Socks5Event]) -> bool:
        buf = self._buf
        if buf[0] != _VERSION:
            raise SocksProtocolError("not a SOCKS5 greeting", _NO_ACCEPTABLE, _NO_METHOD_REPLY)
        if len(buf) < 2:
            return False
        end = 2 + buf[1]
        if len(buf) < end:
            return False
        methods = buf[2:end]
        if _USER_PASS in methods:
            method = _USER_PASS
        elif _NO_AUTH in methods and not self._auth_required:
            method = _NO_AUTH
        else:
            raise SocksProtocolError(
                "no acceptable authentication method", _NO_ACCEPTABLE, _NO_METHOD_REPLY
            )
        del buf[:end]
        self._method = method
        self._state = Socks5Server._credentials if method == _USER_PASS else Socks5Server._request
        out.append(Socks5MethodSelected(method, bytes((_VERSION, method))))
        return True

    def _credentials(self, out: list[Socks5Event]) -> bool:
        buf = self._buf
        if buf[0] != _AUTH_VERSION:
            raise SocksProtocolError("bad sub-negotiation version", 0x01, _AUTH_FAILURE_REPLY)
        n = len(buf)
        if n < 2:
            return False
        ulen = buf[1]
        if n < 3 + ulen:
            return False
        end = 3 + ulen + buf[2 + ulen]
        if n < end:
            return False
        try:
            username = buf[2 : 2 + ulen].decode()
            password = buf[3 + ulen : end].decode()
        except UnicodeDecodeError:
            raise SocksProtocolError(
                "credentials are not UTF-8", 0x01, _AUTH_FAILURE_REPLY
            ) from None
        del buf[:end]
        self._auth = _Auth.PENDING
        self._state = Socks5Server._request
        out.append(Socks5Auth(username, password))
        return True

    def _request(self, out: list[Socks5Event]) -> bool:
        buf = self._buf
        n = len(buf)
        if buf[0] != _VERSION:
            raise _request_error("bad request version", Socks5Reply.GENERAL_FAILURE)
        if n < 2:
            return False
        if buf[1] != _CMD_CONNECT:
            raise _request_error("only CONNECT is supported", Socks5Reply.COMMAND_NOT_SUPPORTED)
        if n < 3:
            return False
        if buf[2] != 0x00:
            raise _request_error("reserved byte is not zero", Socks5Reply.GENERAL_FAILURE)
        if n < 4:
            return False
        atyp = buf[3]
        if atyp == AddressType.IPV4:
            end = 10
            if n < end:
                return False
            host = f"{buf[4]}.{buf[5]}.{buf[6]}.{buf[7]}"
        elif atyp == AddressType.IPV6:
            end = 22
            if n < end:
                return False
            host = ipaddress.IPv6Address(bytes(buf[4:20])).compressed
        elif atyp == AddressType.DOMAIN:
            if n < 5:
                return False
            end = 7 + buf[4]
            if n < end:
                return False
            raw = buf[5 : end - 2]
            if not is_domain_bytes(raw):
                raise _request_error("invalid domain name", Socks5Reply.GENERAL_FAILURE)
            host = raw.decode("ascii")
        else:
            raise _request_error("unknown address type", Socks5Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        port = buf[end - 2] << 8 | buf[end - 1]
        del buf[:end]
        self._state = Socks5Server._hold
        out.append(Socks5Connect(host, port, AddressType(atyp)))
        return True

    def _hold(self, out: list[Socks5Event]) -> bool:
        return False


def _request_error(message: str, code: int) -> SocksProtocolError:
    return SocksProtocolError(message, code, _DEFAULT_REPLIES[code])
