"""The gateway's wire protocols, sans-IO: bytes in, typed events out, bytes to send returned.

Nothing here does I/O or knows about event loops; the listeners drive these objects. Errors
carry what to answer with: `HttpProtocolError.status`, `SocksProtocolError.reply`/`.reply_code`.
"""

from __future__ import annotations

from gateway.protocols.detect import Protocol, detect_protocol
from gateway.protocols.http1 import (
    LAST_CHUNK,
    BadCredentials,
    BodyData,
    ForwardHeaders,
    Headers,
    HttpProtocolError,
    RequestEnd,
    RequestEvent,
    RequestHead,
    RequestParser,
    ResponseEnd,
    ResponseEvent,
    ResponseHead,
    ResponseParser,
    encode_chunk,
    error_response,
    parse_basic_auth,
    serialize_request_head,
    serialize_response_head,
    split_proxy_headers,
)
from gateway.protocols.socks4 import Socks4Connect, Socks4Server
from gateway.protocols.socks5 import (
    AddressType,
    Socks5Auth,
    Socks5Connect,
    Socks5Event,
    Socks5MethodSelected,
    Socks5Reply,
    Socks5Server,
    SocksProtocolError,
)

__all__ = [
    "LAST_CHUNK",
    "AddressType",
    "BadCredentials",
    "BodyData",
    "ForwardHeaders",
    "Headers",
    "HttpProtocolError",
    "Protocol",
    "RequestEnd",
    "RequestEvent",
    "RequestHead",
    "RequestParser",
    "ResponseEnd",
    "ResponseEvent",
    "ResponseHead",
    "ResponseParser",
    "Socks4Connect",
    "Socks4Server",
    "Socks5Auth",
    "Socks5Connect",
    "Socks5Event",
    "Socks5MethodSelected",
    "Socks5Reply",
    "Socks5Server",
    "SocksProtocolError",
    "detect_protocol",
    "encode_chunk",
    "error_response",
    "parse_basic_auth",
    "serialize_request_head",
    "serialize_response_head",
    "split_proxy_headers",
]
