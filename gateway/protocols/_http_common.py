"""HTTP/1.1 events, the error type and the size limits shared by the parser and its helpers.

Header fields are `(name, value)` pairs of `bytes` everywhere in this package: names keep the case
they arrived in (forwarding must not rewrite them) and compare case-insensitively, values have
their surrounding whitespace removed. Bytes avoid a decode per field on the hot path and are what
the forwarder writes back out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "MAX_CHUNK_LINE",
    "MAX_FIELD_LINE",
    "MAX_HEADERS",
    "MAX_HEADER_BLOCK",
    "MAX_START_LINE",
    "TUNNEL_BUFFER_LIMIT",
    "BodyData",
    "Headers",
    "HttpProtocolError",
    "RequestEnd",
    "RequestEvent",
    "RequestHead",
    "ResponseEnd",
    "ResponseEvent",
    "ResponseHead",
]

Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]

#: Longest request line (414 beyond) or status line.
MAX_START_LINE = 8192
#: Longest single field line, name and value (431 beyond).
MAX_FIELD_LINE = 8192
#: Largest header section after the start line, and largest trailer section (431 beyond).
MAX_HEADER_BLOCK = 65536
#: Most header (or trailer) fields in one message (431 beyond).
MAX_HEADERS = 100
#: Longest chunk-size line including chunk extensions.
MAX_CHUNK_LINE = 4096
#: Once an exchange is over (tunnel established, response finished) a parser only holds bytes
#: for the driver; a later feed that would make it hold more than this raises. The bytes that
#: came in the same feed as the head are always kept, whatever their size.
TUNNEL_BUFFER_LIMIT = 65536


class HttpProtocolError(Exception):
    """The peer broke HTTP/1.1; `status` is what to answer with before closing.

    Request parsing gives 400, 414, 431, 501 or 505; response parsing always gives 502 because a
    bad upstream answer becomes a bad gateway. Messages never quote header values, so they cannot
    leak credentials into logs.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def __repr__(self) -> str:
        return f"HttpProtocolError({self.args[0]!r}, status={self.status})"


# The events below are read-only by convention, not frozen: a frozen dataclass sets each field
# through object.__setattr__, which made building a head cost more than parsing it.


@dataclass(slots=True)
class RequestHead:
    """A request head as the proxy needs it.

    Absolute-form (`http://host[:port]/path?q`): `host`, `port` (80 by default) and `path` (the
    origin-form to forward, "/" when empty). CONNECT: `host` and `port` of the authority-form,
    `path` is "". IPv6 hosts come without brackets. `headers` are exactly as received (including
    hop-by-hop fields; see `split_proxy_headers`). `content_length`/`chunked` describe the framing
    of the body that follows; `keep_alive` applies HTTP/1.0 vs 1.1 defaults and the `Connection`
    (and legacy `Proxy-Connection`) tokens.
    """

    method: str
    target: str
    host: str
    port: int
    path: str
    headers: Headers
    http_version: str
    keep_alive: bool
    expect_continue: bool
    content_length: int | None
    chunked: bool


@dataclass(slots=True)
class ResponseHead:
    """A response head. Status 100..199 other than 101 is interim: no body and no end follow."""

    status: int
    reason: str
    headers: Headers
    http_version: str
    keep_alive: bool
    content_length: int | None
    chunked: bool


@dataclass(slots=True)
class BodyData:
    """A piece of the decoded body: chunk framing removed, transfer-coding independent."""

    data: bytes


@dataclass(slots=True)
class RequestEnd:
    """End of a request. `trailers` holds the trailer fields of a chunked body."""

    trailers: Headers = ()


@dataclass(slots=True)
class ResponseEnd:
    """End of a response. `trailers` holds the trailer fields of a chunked body."""

    trailers: Headers = ()


RequestEvent: TypeAlias = RequestHead | BodyData | RequestEnd
ResponseEvent: TypeAlias = ResponseHead | BodyData | ResponseEnd
