"""Decisions for the everyday plain HTTP request, made once per distinct input and reused.

Scrapers and crawlers send the same header fields on every request of a connection (often of
every connection), and an origin often answers with the same head: what the gateway makes of
those (the fields to forward, the route and the lease request, the response head to pass on
and how its body is framed) is decided by the full parsers and the routing code the first
time, and looked up by the raw bytes after that. Only requests and responses of the plainest
shape get a plan; `None` (also remembered) sends everything else down the general path, so the
two paths never disagree on what is valid or how it is answered.

The keep-alive lane (`gateway.http_lane`) carries a request on these plans without building
any parser event or exchange object.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

from core.models import LeaseRequest, Upstream
from gateway.dial import basic_credentials
from gateway.errors import GatewayError
from gateway.exchange import response_headers
from gateway.protocols import (
    Headers,
    HttpProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    serialize_request_head,
    serialize_response_head,
)
from gateway.protocols.http1 import MAX_START_LINE, REASON_PHRASES

if TYPE_CHECKING:
    from gateway.context import Routed

__all__ = [
    "MAX_REQUEST_LINE",
    "ExpressPlans",
    "RequestPlan",
    "ResponsePlan",
    "Target",
    "host_value",
    "split_request_line",
]

#: Longer request lines go the general path, which refuses them (414).
MAX_REQUEST_LINE: Final = MAX_START_LINE
#: The methods the plans serve, each with the space after it: those whose bodiless requests
#: may be sent again (so they may ride a kept connection).
_METHODS: Final = (b"GET ", b"OPTIONS ", b"TRACE ", b"PUT ", b"DELETE ")
_SCHEME: Final = b"http://"
_VERSION: Final = b" HTTP/1.1"
#: A target's authority the plans serve: a name and maybe a port (no userinfo, no IPv6
#: literal).
_AUTHORITY: Final = re.compile(rb"(?:[A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?(?::[1-9][0-9]{0,4})?")
#: The bytes its path and query may hold: RFC 3986's unreserved and reserved ones, and "%".
_PATH_BYTES: Final = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?@!$&'()*+,;=%"
)
#: Per byte value: 0 for bytes no served target holds, else 1, or `_ENDS_AUTHORITY` for "/"
#: and "?".
_ENDS_AUTHORITY: Final = 2
_TARGET_BYTES: Final = bytes(
    (_ENDS_AUTHORITY if byte in b"/?" else 1) if byte in _PATH_BYTES else 0 for byte in range(256)
)
_FOLD_CASE: Final = 0x20
# A request line to validate a header section with: nothing in it depends on the line.
_PROBE_LINE: Final = b"GET http://plan.invalid/ HTTP/1.1\r\n"
_KEPT: Final = 1024
#: Longer heads are planned each time, never kept: the caches stay small whatever comes.
_KEPT_HEAD_BYTES: Final = 4096
_K = TypeVar("_K")
_V = TypeVar("_V")


def _split_by_searching(data: bytes, line_end: int) -> tuple[int, int]:
    """`split_request_line` with the bytes methods: fewest steps for the interpreter."""
    if not data.startswith(_METHODS):
        return -1, -1
    method_end = data.find(b" ")
    authority_start = method_end + 1 + len(_SCHEME)
    target_end = line_end - len(_VERSION)
    if target_end <= authority_start or not data.endswith(_VERSION, 0, line_end):
        return -1, -1
    if (
        not data.startswith(_SCHEME, method_end + 1)
        and data[method_end + 1 : authority_start].lower() != _SCHEME  # the scheme's case
    ):
        return -1, -1
    authority_end = target_end
    slash = data.find(b"/", authority_start, target_end)
    if slash >= 0:
        authority_end = slash
    query = data.find(b"?", authority_start, authority_end)
    if query >= 0:
        authority_end = query
    if authority_end == authority_start or (
        authority_end < target_end and data[authority_end:target_end].translate(None, _PATH_BYTES)
    ):
        return -1, -1
    return method_end, authority_end


def _split_by_scanning(data: bytes, line_end: int) -> tuple[int, int]:
    """`split_request_line` byte by byte: compiled, each step is a machine instruction or
    two, where each bytes method is a call through the interpreter's machinery."""
    for method in _METHODS:
        if _holds(data, 0, method):
            break
    else:
        return -1, -1
    method_end = len(method) - 1
    authority_start = method_end + 1 + len(_SCHEME)
    target_end = line_end - len(_VERSION)
    if (
        target_end <= authority_start
        or not _holds(data, target_end, _VERSION)
        or not _holds(data, method_end + 1, b"http", _FOLD_CASE)
        or not _holds(data, method_end + 5, b"://")
    ):
        return -1, -1
    index = authority_start
    while index < target_end and _TARGET_BYTES[data[index]] != _ENDS_AUTHORITY:
        index += 1
    authority_end = index
    if authority_end == authority_start:
        return -1, -1
    while index < target_end:
        if not _TARGET_BYTES[data[index]]:
            return -1, -1
        index += 1
    return method_end, authority_end


def _holds(data: bytes, start: int, word: bytes, fold: int = 0) -> bool:
    """Whether `word` is in `data` at `start`; `fold` 0x20 matches letters in either case
    (`word` in lower case)."""
    if start + len(word) > len(data):
        return False
    return all(data[start + index] | fold == word[index] for index in range(len(word)))


#: `split_request_line`: where the method and the authority end in a request line
#: (`data[:line_end]`) the plans serve: HTTP/1.1, a method of `_METHODS`, an
#: `http://authority` target (the scheme in any case) with maybe a path and query of
#: `_PATH_BYTES`. (-1, -1) for any other line: the general path takes it. The authority itself
#: is checked once, when its target is planned (`plan_target`). Two ways to the same answer
#: (tests hold both to it): compiled (setup.py), this module scans; interpreted, it searches.
split_request_line = _split_by_searching if __file__.endswith(".py") else _split_by_scanning


class RequestPlan:
    """What a request with these header fields becomes (with any line `split_request_line`
    serves)."""

    __slots__ = ("fields", "keep_alive", "pool", "request", "routed")

    def __init__(
        self, routed: Routed, request: LeaseRequest, fields: bytes, keep_alive: bool
    ) -> None:
        self.routed = routed
        self.request = request
        self.pool = request.pool
        #: The fields to send up, serialized, Host left out (the target names it).
        self.fields = fields
        #: The client's connection stays open after the answer.
        self.keep_alive = keep_alive


class Target:
    """An authority from a request line, its destination allowed."""

    __slots__ = ("host", "host_field", "port")

    def __init__(self, host: str, port: int, host_field: bytes) -> None:
        self.host = host
        self.port = port
        #: The Host field line sent up, CRLF included.
        self.host_field = host_field


class ResponsePlan:
    """What a response head becomes for an HTTP/1.1 client of a GET-like request."""

    __slots__ = ("closing_head", "head", "keep_alive", "length")

    def __init__(self, head: bytes, length: int, keep_alive: bool) -> None:
        #: The head to send the client, and the one for a client that asked to close.
        self.head = head
        self.closing_head = head[:-2] + b"Connection: close\r\n\r\n"
        #: The body's length: the response is whole once that many bytes followed the head.
        self.length = length
        #: The upstream's connection may carry another request after this response.
        self.keep_alive = keep_alive


class ExpressPlans:
    """The caches of plans, bounded, for one gateway (its routing and Via)."""

    def __init__(
        self,
        route: Callable[[Headers, str | None], Routed],
        check_destination: Callable[[str, int], None],
        via: bytes,
    ) -> None:
        self._route = route
        self._check_destination = check_destination
        self._via = via
        self._requests: dict[str | None, dict[bytes, RequestPlan | None]] = {}
        self.targets: dict[bytes, Target | None] = {}
        self.responses: dict[bytes, ResponsePlan | None] = {}
        self._tails: dict[tuple[str, bool], bytes] = {}

    def requests_for(self, listener_pool: str | None) -> dict[bytes, RequestPlan | None]:
        """The request plans of one listener, by header section (fields and the blank line)."""
        return self._requests.setdefault(listener_pool, {})

    def plan_request(
        self, plans: dict[bytes, RequestPlan | None], fields: bytes, listener_pool: str | None
    ) -> RequestPlan | None:
        """Decide, and remember, what requests with this header section become: None for
        anything but a bodiless request routed without error to a plain lease."""
        plan = self._plan_request(fields, listener_pool)
        if len(fields) <= _KEPT_HEAD_BYTES:
            _remember(plans, fields, plan)
        return plan

    def _plan_request(self, fields: bytes, listener_pool: str | None) -> RequestPlan | None:
        try:
            events = RequestParser().feed(_PROBE_LINE + fields)
        except HttpProtocolError:
            return None
        if len(events) != 2:
            return None  # a body, or not a whole head
        head = events[0]
        assert isinstance(head, RequestHead)
        if head.expect_continue:
            return None
        try:
            routed = self._route(head.headers, listener_pool)
        except GatewayError:
            return None  # the general path answers it
        kept = [pair for pair in routed.fields.headers if pair[0].lower() != b"host"]
        # The same bytes `serialize_request_head` makes of them, start line and end left off.
        serialized = serialize_request_head("GET", "/", kept)
        start = serialized.index(b"\r\n") + 2
        return RequestPlan(routed, routed.lease_request, serialized[start:-2], head.keep_alive)

    def plan_target(self, authority: bytes) -> Target | None:
        """The target of the authority of a line `split_request_line` served, itself and its
        destination checked (None when refused: the general path answers that)."""
        if _AUTHORITY.fullmatch(authority) is None:
            return None
        host_text, _, port_text = authority.decode("ascii").partition(":")
        port = int(port_text) if port_text else 80
        if len(host_text) > 255 or port > 65535:
            return None
        try:
            self._check_destination(host_text, port)
        except GatewayError:
            return None
        target = Target(host_text, port, b"Host: " + host_value(host_text, port) + b"\r\n")
        _remember(self.targets, authority, target)
        return target

    def tail(self, upstream: Upstream, forward: bool) -> bytes:
        """What follows the Host field up to the blank line, through `upstream`: Via, and
        the upstream proxy's credentials when it has some and is sent the request as a proxy."""
        key = (upstream.id, forward)
        tail = self._tails.get(key)
        if tail is None:
            tail = b"Via: " + self._via + b"\r\n"
            endpoint = upstream.endpoint
            if forward and endpoint.has_credentials:
                tail += b"Proxy-Authorization: " + basic_credentials(endpoint) + b"\r\n"
            tail += b"\r\n"
            _remember(self._tails, key, tail)
        return tail

    def plan_response(self, head: bytes) -> ResponsePlan | None:
        """Decide, and remember, what a response head becomes: None for anything but a final
        answer below 500 (407 and 101 included: they need judging) framed by Content-Length."""
        plan = self._plan_response(head)
        if len(head) <= _KEPT_HEAD_BYTES:
            _remember(self.responses, head, plan)
        return plan

    def _plan_response(self, raw: bytes) -> ResponsePlan | None:
        try:
            events = ResponseParser("GET").feed(raw)
        except HttpProtocolError:
            return None
        head = events[0]
        assert isinstance(head, ResponseHead)
        status = head.status
        if status < 200 or status >= 500 or status == 407 or head.chunked:
            return None
        if status == 204 or status == 304:
            length = 0
        elif head.content_length is None:
            return None
        else:
            length = head.content_length
        reason = head.reason or REASON_PHRASES.get(status, "")
        out = serialize_response_head(status, reason, response_headers(head, self._via))
        return ResponsePlan(out, length, head.keep_alive)


_HOST_VALUES: Final[dict[tuple[str, int], bytes]] = {}


def host_value(host: str, port: int) -> bytes:
    """The Host field value for a target: IPv6 literals in brackets, port 80 left out."""
    # Targets repeat: built and encoded once per target, not per request.
    key = (host, port)
    value = _HOST_VALUES.get(key)
    if value is None:
        text = f"[{host}]" if ":" in host else host
        value = (text if port == 80 else f"{text}:{port}").encode()
        _remember(_HOST_VALUES, key, value)
    return value


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    if len(cache) >= _KEPT:
        cache.clear()
    cache[key] = value
