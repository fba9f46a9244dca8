"""HTTP/1.1 for a forward proxy, sans-IO: parsers, serializers and header helpers.

Header fields are `(name, value)` pairs of `bytes` throughout (see `_http_common`). Feed the
parsers whatever the socket returned; write what the serializers return.
"""

from __future__ import annotations

from gateway.protocols._http_common import (
    MAX_CHUNK_LINE,
    MAX_FIELD_LINE,
    MAX_HEADER_BLOCK,
    MAX_HEADERS,
    MAX_START_LINE,
    TUNNEL_BUFFER_LIMIT,
    BodyData,
    Headers,
    HttpProtocolError,
    RequestEnd,
    RequestEvent,
    RequestHead,
    ResponseEnd,
    ResponseEvent,
    ResponseHead,
)
from gateway.protocols._http_fields import (
    BadCredentials,
    ForwardHeaders,
    parse_basic_auth,
    split_proxy_headers,
)
from gateway.protocols._http_parse import RequestParser, ResponseParser
from gateway.protocols._http_write import (
    LAST_CHUNK,
    REASON_PHRASES,
    encode_chunk,
    error_response,
    serialize_request_head,
    serialize_response_head,
)

__all__ = [
    "LAST_CHUNK",
    "MAX_CHUNK_LINE",
    "MAX_FIELD_LINE",
    "MAX_HEADERS",
    "MAX_HEADER_BLOCK",
    "MAX_START_LINE",
    "REASON_PHRASES",
    "TUNNEL_BUFFER_LIMIT",
    "BadCredentials",
    "BodyData",
    "ForwardHeaders",
    "Headers",
    "HttpProtocolError",
    "RequestEnd",
    "RequestEvent",
    "RequestHead",
    "RequestParser",
    "ResponseEnd",
    "ResponseEvent",
    "ResponseHead",
    "ResponseParser",
    "encode_chunk",
    "error_response",
    "parse_basic_auth",
    "serialize_request_head",
    "serialize_response_head",
    "split_proxy_headers",
]
