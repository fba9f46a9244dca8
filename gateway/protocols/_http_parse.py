"""Incremental HTTP/1.1 request and response parsers for the proxy side, on top of llhttp.

llhttp (through httptools) validates start lines and fields as they stream in, so garbage such as a
TLS ClientHello sent to the plain-HTTP port fails on its first bytes. It only ever sees heads: we
find the blank line that ends a head ourselves and feed llhttp up to it, then frame the body here
(fixed length, chunked, or until EOF). That gives exact message boundaries for pipelining and
CONNECT, body pieces that are slices of what was fed (no copy when a whole read is body), trailers,
hard caps on everything buffered, and one place for the checks llhttp leaves to its caller.

Both parsers follow one contract: `feed(data)` returns the events completed by `data`, in order,
or raises `HttpProtocolError`, after which every call raises the same error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import httptools

from gateway.protocols._hosts import split_authority
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

__all__ = ["RequestParser", "ResponseParser", "has_ctl", "is_token"]

_E = TypeVar("_E")
_Buffer = bytes | bytearray
_LLHttp = httptools.HttpRequestParser | httptools.HttpResponseParser

_CRLFS = re.compile(rb"(?:\r\n)+")
_ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^#]*)")
# The everyday `http://name[:port]/path` in one match; IPv6 literals, odd ports and every error
# take the general path. The host part is `_hosts._REG_NAME`.
_PLAIN_HTTP_TARGET = re.compile(
    r"[Hh][Tt][Tt][Pp]://((?:[A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?)(?::([1-9][0-9]{0,4}))?"
    r"([/?][^#]*)?"
)
# Strict shapes of a head that may skip llhttp: known methods, RFC 3986 target characters
# (no fragment, no IPv6 brackets), field names of token characters, field values of visible
# ASCII, spaces and tabs. Everything else (obs-text, folding, bare LF, ...) goes to llhttp.
_FAST_FIELD_LINE = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*[\t\x20-\x7e]*\r\n"
_FAST_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e]*)\r\n")
_FAST_REQUEST = re.compile(
    rb"(?P<code>GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH) "
    rb"(?P<text>[A-Za-z0-9\-._~:/?@!$&'()*+,;=%]+) HTTP/1\.(?P<minor>[01])\r\n"
    rb"(?P<fields>(?:" + _FAST_FIELD_LINE + rb")*)\r\n"
)
_FAST_RESPONSE = re.compile(
    rb"HTTP/1\.(?P<minor>[01]) (?P<code>[1-9][0-9][0-9]) (?P<text>[\t\x20-\x7e]*)\r\n"
    rb"(?P<fields>(?:" + _FAST_FIELD_LINE + rb")*)\r\n"
)
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Everything a field value may not contain: controls except HTAB, and DEL (RFC 9110 §5.5).
_CTL_CHARS = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"
_MAX_HEAD = MAX_START_LINE + 2 + MAX_HEADER_BLOCK
# 2**64 - 1 is 16 hex digits; llhttp overflows past that and so should we.
_MAX_CHUNK_SIZE_DIGITS = 16
_MAX_LENGTH_DIGITS = 19

_METHODS = {
    m.encode(): m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
}
_REQUEST_END = RequestEnd()
_RESPONSE_END = ResponseEnd()

# The fields the framing and connection logic looks at, by lower-cased name.
_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _EXPECT, _HOST = range(5)
_SPECIAL_LOWER = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    # Pre-1.1 clients still say Proxy-Connection to a proxy; treat it as Connection for keep-alive.
    b"proxy-connection": _CONNECTION,
    b"expect": _EXPECT,
    b"host": _HOST,
}
# Looked up once per field: the usual spellings hit directly, and only a field whose name has
# the length of a special one pays for lower() (bytes cache their hash, a lower() allocates).
_SPECIAL = {**_SPECIAL_LOWER, **{k.title(): v for k, v in _SPECIAL_LOWER.items()}}
_SPECIAL_LENGTHS = frozenset(len(k) for k in _SPECIAL_LOWER)
_COMMON_CONNECTION = {
    v: frozenset({v.lower()}) for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close")
}


def is_token(name: bytes | bytearray) -> bool:
    """A non-empty RFC 9110 token (field names, methods)."""
    return bool(name) and not name.translate(None, _TOKEN_CHARS)


def has_ctl(value: bytes | bytearray) -> bool:
    """True when `value` holds a byte no field value may carry (NUL, CR, LF, other controls)."""
    return len(value.translate(None, _CTL_CHARS)) != len(value)


def _piece(data: _Buffer, start: int, end: int) -> bytes:
    # A full slice of bytes is the object itself: a read that is all body reaches the driver as-is.
    if type(data) is bytes:
        return data[start:end]
    return bytes(data[start:end])


def _chunk_size(line: _Buffer) -> int:
    """The size in a chunk-size line, or -1. Like llhttp, no whitespace around the size."""
    size, _, extensions = line.partition(b";")
    if not 0 < len(size) <= _MAX_CHUNK_SIZE_DIGITS or size.translate(None, _HEX_DIGITS):
        return -1
    if extensions and has_ctl(extensions):
        return -1
    return int(size, 16)


def _codings(transfer_encoding: bytes) -> list[bytes]:
    return [t.strip(b" \t") for t in transfer_encoding.lower().split(b",")]


class _Collector:
    """llhttp callbacks. A separate object, so parser -> llhttp -> callbacks makes no cycle."""

    __slots__ = ("code", "complete", "done", "headers", "reason", "special", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.reason = b""
        #: Set once the head is complete: the HTTP version, and the method (requests, bytes)
        #: or the status code (responses).
        self.version = ""
        self.code: bytes | int = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.special: list[tuple[int, bytes]] = []
        self.done = False
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp strips whitespace before a value but keeps it after.
        value = value.rstrip(b" \t")
        self.headers.append((name, value))
        kind = _SPECIAL.get(name)
        if kind is None and len(name) in _SPECIAL_LENGTHS:
            kind = _SPECIAL_LOWER.get(name.lower())
        if kind is not None:
            self.special.append((kind, value))

    def on_headers_complete(self) -> None:
        self.done = True

    def on_message_complete(self) -> None:
        self.complete = True

    def reset(self) -> None:
        self.url = b""
        self.reason = b""
        self.headers.clear()
        self.special.clear()
        self.done = False
        self.complete = False


class _FieldInfo:
    """What the framing logic needs from a header section, gathered in one pass."""

    __slots__ = ("connection", "content_length", "expect_continue", "hosts", "transfer_encoding")

    def __init__(self) -> None:
        self.content_length: int | None = None
        self.transfer_encoding: bytes | None = None
        self.connection: frozenset[bytes] = frozenset()
        self.expect_continue = False
        self.hosts = 0

    def keep_alive(self, version: str) -> bool:
        """Persistence by version and Connection tokens (RFC 9112 §9.3)."""
        if version == "1.1":
            return b"close" not in self.connection
        # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is suspect framing; close after it.
        return (
            b"keep-alive" in self.connection
            and b"close" not in self.connection
            and self.transfer_encoding is None
        )


_Step = Callable[["_Parser[Any]", _Buffer, int, list[Any]], int]


class _Parser(Generic[_E]):
    """Buffering, head streaming and body framing shared by both directions.

    A step takes `(data, pos, out)`, appends events to `out` and returns the new position; it
    returns `pos` unchanged only when it needs more bytes, which are then kept for the next feed.
    Steps only ever leave an incomplete unit behind (a partial chunk-size line, trailer section
    or CRLF), never a whole read, so the copy into the buffer stays small.
    """

    __slots__ = (
        "_buf",
        "_c",
        "_error",
        "_head_size",
        "_llhttp",
        "_remaining",
        "_scan",
        "_start_line",
        "_step",
        "_tail",
        "_tunnel",
    )

    #: A whole head in the strict shape `_fast_head` takes (groups code, text, minor, fields).
    _FAST_HEAD: ClassVar[re.Pattern[bytes]]
    #: Replaces every status hint (responses: a bad upstream answer is a 502 for our client).
    _STATUS: ClassVar[int | None] = None
    _WHAT: ClassVar[str] = "message"

    def __init__(self) -> None:
        self._buf = bytearray()
        self._c = _Collector()
        self._llhttp: _LLHttp | None = None
        self._error: HttpProtocolError | None = None
        self._step: _Step = _Parser._step_head
        self._head_size = 0  # bytes of the current head fed to llhttp so far
        self._start_line = -1  # length of its start line once its CRLF was seen
        self._tail = b""  # its last three bytes: a CRLF CRLF may straddle two reads
        self._remaining = 0  # body bytes left in a Content-Length body or in a chunk
        self._scan = 0  # bytes of a pending trailer section already searched
        self._tunnel = False

    # -- public ---------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray) -> list[_E]:
        """Parse `data` and return the events it completes, in order."""
        if self._error is not None:
            raise self._error
        out: list[Any] = []
        if self._step is _Parser._step_hold:
            if len(self._buf) + len(data) > TUNNEL_BUFFER_LIMIT:
                raise self._set_error(self._fail("too much data after the end of the exchange"))
            self._buf += data
            return out
        try:
            pos = self._drain(data, out) if self._buf else 0
            n = len(data)
            step = self._step
            while pos < n:
                new = step(self, data, pos, out)
                if new == pos:
                    self._buf += memoryview(data)[pos:]
                    break
                pos = new
                step = self._step
        except HttpProtocolError as exc:
            raise self._set_error(exc) from None
        return out

    @property
    def at_rest(self) -> bool:
        """Between messages, nothing buffered and no error: a whole message fed now is all
        that the events of that feed are about."""
        return (
            self._step is _Parser._step_head
            and not self._buf
            and self._head_size == 0
            and self._error is None
        )

    @property
    def tunnel(self) -> bool:
        """True once the connection stopped being HTTP (CONNECT accepted, 101 Switching)."""
        return self._tunnel

    def take_buffered(self) -> bytes:
        """Bytes fed but not parsed: after a CONNECT or 101 they are the start of the tunnel."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    # -- plumbing -------------------------------------------------------------------------

    def _drain(self, data: _Buffer, out: list[Any]) -> int:
        """Finish the unit left incomplete by the last feed, then hand back to `data`.

        Returns where to continue in `data`, or len(data) when everything went to the buffer.
        """
        buf = self._buf
        old = len(buf)
        buf += data
        pos = 0
        while True:
            new = self._step(self, buf, pos, out)
            if new == pos:
                del buf[:pos]
                return len(data)
            pos = new
            # The buffered unit is complete: continue on `data` itself, so later body pieces
            # are slices of the caller's bytes rather than copies out of the buffer.
            if pos >= old:
                buf.clear()
                return pos - old

    def _set_error(self, exc: HttpProtocolError) -> HttpProtocolError:
        self._error = exc
        self._buf.clear()
        self._llhttp = None
        return exc

    def _fail(self, message: str, status: int = 400) -> HttpProtocolError:
        return HttpProtocolError(message, self._STATUS or status)

    def _new_llhttp(self) -> _LLHttp:
        raise NotImplementedError

    def _on_head(self, out: list[Any], block: int) -> None:
        """Turn the head collected in `_c` into events; `block` is its header section size."""
        raise NotImplementedError

    def _code(self, parser: _LLHttp) -> bytes | int:
        """What llhttp read from the start line: the method or the status code."""
        raise NotImplementedError

    def _fast_head(self, head: _Buffer) -> bool:
        """Collect a complete head of the usual strict shape without llhttp (False: not of
        that shape, for llhttp to judge). Only a subset of what llhttp accepts passes here,
        so the two paths never disagree on what is valid; llhttp's per-field callbacks are
        what most of a small exchange's parsing cost was."""
        match = self._FAST_HEAD.fullmatch(head)
        if match is None:
            return False
        code, text, minor, fields = match.group("code", "text", "minor", "fields")
        c = self._c
        c.version = "1.1" if minor == b"1" else "1.0"
        if self._WHAT == "request":
            c.code, c.url = code, text
        else:
            c.code, c.reason = int(code), text
        on_header = c.on_header
        for name, value in _FAST_FIELD.findall(fields):
            on_header(name, value)
        codings = [value for kind, value in c.special if kind == _TRANSFER_ENCODING]
        if codings and (len(codings) > 1 or codings[0].lower() != b"chunked"):
            c.reset()  # llhttp judges any transfer coding but a lone chunked
            return False
        return True

    def _on_end(self, out: list[Any], trailers: Headers) -> None:
        raise NotImplementedError

    def _pause_is_switch(self, parser: _LLHttp) -> bool:
        """Whether an llhttp pause right after a complete head means a protocol switch."""
        return False

    # -- head -----------------------------------------------------------------------------

    def _step_head(self, data: _Buffer, pos: int, out: list[Any]) -> int:
        n = len(data)
        if self._head_size == 0:
            if data.startswith(b"\r\n", pos):
                # RFC 9112 §2.2: empty lines before a start line are ignored (clients send a
                # stray CRLF after a body).
                match = _CRLFS.match(data, pos)
                return n if match is None else match.end()
            if pos + 1 == n and data[pos] == 0x0D:
                return pos  # the CR of such a CRLF; wait for its LF
        base = self._head_size
        end = self._find_head_end(data, pos, pos + _MAX_HEAD + 4 - base)
        stop = n if end < 0 else end
        size = base + stop - pos
        if self._start_line < 0:
            self._measure_start_line(data, pos, stop)
        if self._start_line >= 0 and size - self._start_line - 2 > MAX_HEADER_BLOCK:
            raise self._fail("header section too large", 431)

        c = self._c
        if base == 0 and end >= 0 and self._llhttp is None and self._fast_head(data[pos:end]):
            self._on_head(out, size - self._start_line)
            self._start_line = -1
            c.reset()
            return end
        parser = self._llhttp
        if parser is None:
            parser = self._llhttp = self._new_llhttp()
        paused = False
        try:
            parser.feed_data(data if stop - pos == n else data[pos:stop])
        except httptools.HttpParserUpgrade:
            paused = True
        except httptools.HttpParserError as exc:
            if not (c.done and self._pause_is_switch(parser)):
                raise self._fail(f"malformed {self._WHAT} head: {exc}") from None
            paused = True

        if end < 0:
            if paused:
                raise self._fail(f"malformed {self._WHAT} head")
            self._head_size = size
            if stop - pos >= 3:
                self._tail = bytes(data[stop - 3 : stop])
            else:
                self._tail = (self._tail + data[pos:stop])[-3:]
            if len(c.headers) > MAX_HEADERS:
                raise self._fail("too many header fields", 431)
            return n
        if not c.done:
            raise self._fail(f"malformed {self._WHAT} head")
        self._head_size = 0
        self._tail = b""
        # llhttp is back at a message start only if it saw the whole message, i.e. no body,
        # and the message kept the connection open: after one that did not, llhttp refuses
        # whatever follows, which the head's own checks (fed whole) would parse.
        if paused or not c.complete or not parser.should_keep_alive():
            self._llhttp = None
        c.version = parser.get_http_version()
        c.code = self._code(parser)
        self._on_head(out, size - self._start_line)
        self._start_line = -1
        c.reset()
        return end

    def _find_head_end(self, data: _Buffer, pos: int, bound: int) -> int:
        """Index just past the CRLF CRLF ending the head, or -1."""
        tail = self._tail
        if tail:
            probe = tail + data[pos : pos + 3]
            i = probe.find(b"\r\n\r\n")
            if i >= 0:
                return pos + i + 4 - len(tail)
        i = data.find(b"\r\n\r\n", pos, bound)
        return -1 if i < 0 else i + 4

    def _measure_start_line(self, data: _Buffer, pos: int, stop: int) -> None:
        base = self._head_size
        if base and self._tail.endswith(b"\r") and data.startswith(b"\n", pos):
            line = base - 1
        else:
            i = data.find(b"\r\n", pos, stop)
            line = -1 if i < 0 else base + i - pos
        if line < 0:
            # +1: the line may end in the CR of its CRLF.
            if base + stop - pos > MAX_START_LINE + 1:
                raise self._fail(f"{self._WHAT} start line too long", 414)
        elif line > MAX_START_LINE:
            raise self._fail(f"{self._WHAT} start line too long", 414)
        else:
            self._start_line = line

    def _scan_fields(self, headers: Headers, block: int) -> _FieldInfo:
        """Limits and the special fields of a head whose header section is `block` bytes."""
        if len(headers) > MAX_HEADERS:
            raise self._fail("too many header fields", 431)
        # A section shorter than the field limit cannot hold an oversized field.
        if block > MAX_FIELD_LINE:
            for name, value in headers:
                if len(name) + len(value) > MAX_FIELD_LINE:
                    raise self._fail("header field too large", 431)
        info = _FieldInfo()
        for kind, value in self._c.special:
            if kind == _CONTENT_LENGTH:
                # llhttp already refuses all of these; the check is cheap insurance.
                if (
                    info.content_length is not None
                    or not value.isdigit()
                    or len(value) > _MAX_LENGTH_DIGITS
                ):
                    raise self._fail("invalid Content-Length")
                info.content_length = int(value)
            elif kind == _TRANSFER_ENCODING:
                te = info.transfer_encoding
                info.transfer_encoding = value if te is None else te + b"," + value
            elif kind == _CONNECTION:
                tokens = _COMMON_CONNECTION.get(value)
                if tokens is None:
                    tokens = frozenset(t.strip(b" \t") for t in value.lower().split(b","))
                info.connection = info.connection | tokens if info.connection else tokens
            elif kind == _EXPECT:
                if value.lower() == b"100-continue":
                    info.expect_continue = True
            else:
                info.hosts += 1
        if info.transfer_encoding is not None and info.content_length is not None:
            raise self._fail("both Content-Length and Transfer-Encoding")
        return info

    def _is_chunked(self, transfer_encoding: bytes | None) -> bool:
        """Only a lone `chunked` is accepted: the forwarder re-frames bodies, and a transfer
        coding under the chunking could not survive that."""
        if transfer_encoding is None:
            return False
        codings = _codings(transfer_encoding)
        if codings == [b"chunked"]:
            return True
        if codings[-1] == b"chunked":
            raise self._fail("unsupported transfer coding", 501)
        raise self._fail("Transfer-Encoding must end with chunked")

    # -- body -----------------------------------------------------------------------------

    def _step_length(self, data: _Buffer, pos: int, out: list[Any]) -> int:
        end = min(len(data), pos + self._remaining)
        out.append(BodyData(_piece(data, pos, end)))
        self._remaining -= end - pos
        if not self._remaining:
            self._on_end(out, ())
        return end

    def _step_chunk_size(self, data: _Buffer, pos: int, out: list[Any]) -> int:
        i = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE + 2)
        if i < 0:
            if len(data) - pos > MAX_CHUNK_LINE + 1:
                raise self._fail("chunk size line too long")
            return pos
        size = _chunk_size(data[pos:i])
        if size < 0:
            raise self._fail("invalid chunk size line")
        if size:
            self._remaining = size
            self._step = _Parser._step_chunk_data
        else:
            self._scan = 0
            self._step = _Parser._step_trailers
        return i + 2

    def _step_chunk_data(self, data: _Buffer, pos: int, out: list[Any]) -> int:
        end = min(len(data), pos + self._remaining)
        out.append(BodyData(_piece(data, pos, end)))
        self._remaining -= end - pos
        if not self._remaining:
            self._step = _Parser._step_chunk_crlf
        return end

    def _step_chunk_crlf(self, data: _Buffer, pos: int, out: list[Any]) -> int:
        if data.startswith(b"\r\n", pos):
            self._step = _Parser._step_chunk_size
            return pos + 2
        if len(data) - pos >= 2 or data[pos] != 0x0D:
            raise self._fail("chunk data not followed by CRLF")
        return pos

    def _step_trailers(self, data: _Buffer, pos: int, out: list[Any]) -> int:
        if data.startswith(b"\r\n", pos):
            self._on_end(out, ())
            return pos + 2
        n = len(data)
        if n - pos < 2:
            return pos
        i = data.find(b"\r\n\r\n", pos + max(0, self._scan - 3), pos + MAX_HEADER_BLOCK + 4)
        if i < 0:
            if n - pos > MAX_HEADER_BLOCK:
                raise self._fail("trailer section too large", 431)
            self._scan = n - pos
            return pos
        self._on_end(out, self._parse_trailers(bytes(data[pos:i])))
        return i + 4

    def _parse_trailers(self, block: bytes) -> Headers:
        # Trailers are rare, so they get a plain parser rather than a second llhttp pass.
        lines = block.split(b"\r\n")
        if len(lines) > MAX_HEADERS:
            raise self._fail("too many trailer fields", 431)
        fields = []
        for line in lines:
            if len(line) > MAX_FIELD_LINE:
                raise self._fail("trailer field too large", 431)
            name, colon, value = line.partition(b":")
            # A leading space (obs-fold) or a space before the colon fails the token check.
            value = value.strip(b" \t")
            if not colon or not is_token(name) or has_ctl(value):
                raise self._fail("malformed trailer field")
            fields.append((name, value))
        return tuple(fields)

    def _step_eof(self, data: _Buffer, pos: int, out: list[Any]) -> int:
        out.append(BodyData(_piece(data, pos, len(data))))
        return len(data)

    def _step_hold(self, data: _Buffer, pos: int, out: list[Any]) -> int:
        return pos


class RequestParser(_Parser[RequestEvent]):
    """Parses what a client sends to the proxy.

    Only proxy requests are accepted: absolute-form `http://` targets and CONNECT authority-form.
    Events per request: `RequestHead`, `BodyData`*, `RequestEnd`. After a CONNECT head and its
    `RequestEnd` the parser stops: `tunnel` turns True and `take_buffered()` returns the bytes
    that followed the head. Pipelined requests come out in order. An error raised while parsing a
    later pipelined request discards the events of that feed: the gateway answers the error and
    closes, and a pipelining client retries.
    """

    __slots__ = ()

    _WHAT = "request"
    _FAST_HEAD = _FAST_REQUEST

    def _new_llhttp(self) -> _LLHttp:
        return httptools.HttpRequestParser(self._c)

    def _on_end(self, out: list[Any], trailers: Headers) -> None:
        out.append(RequestEnd(trailers) if trailers else _REQUEST_END)
        self._step = _Parser._step_head

    def feed_eof(self) -> list[RequestEvent]:
        """The client closed. Raises (400) if a request was cut short, else returns []."""
        if self._error is not None:
            raise self._error
        if self._tunnel or (
            self._step is _Parser._step_head
            and self._head_size == 0
            and not self._buf.strip(b"\r\n")
        ):
            return []
        raise self._set_error(self._fail("connection closed in the middle of a request"))

    def _code(self, parser: _LLHttp) -> bytes:
        assert isinstance(parser, httptools.HttpRequestParser)
        return parser.get_method()

    def _on_head(self, out: list[Any], block: int) -> None:
        version = self._c.version
        if version != "1.1" and version != "1.0":
            raise self._fail("unsupported HTTP version", 505)
        raw_method = self._c.code
        assert isinstance(raw_method, bytes)
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        headers = tuple(self._c.headers)
        info = self._scan_fields(headers, block)
        if info.hosts > 1:
            raise self._fail("more than one Host field")
        chunked = self._is_chunked(info.transfer_encoding)
        content_length = info.content_length
        target = self._c.url.decode("latin-1")
        if method == "CONNECT":
            authority = split_authority(target, None)
            if authority is None:
                raise self._fail("CONNECT target must be host:port")
            # RFC 9110 §9.3.6: a CONNECT request has no content; refuse rather than guess.
            if chunked or content_length:
                raise self._fail("CONNECT request with a body")
            host, port = authority
            path = ""
        else:
            host, port, path = self._absolute_form(target)
        keep_alive = info.keep_alive(version)
        out.append(
            RequestHead(
                method,
                target,
                host,
                port,
                path,
                headers,
                version,
                keep_alive,
                # RFC 9110 §10.1.1: a 100-continue expectation from HTTP/1.0 is ignored.
                info.expect_continue and version == "1.1",
                content_length,
                chunked,
            )
        )
        if method == "CONNECT":
            out.append(_REQUEST_END)
            self._tunnel = True
            self._step = _Parser._step_hold
        elif chunked:
            self._step = _Parser._step_chunk_size
        elif content_length:
            self._remaining = content_length
            self._step = _Parser._step_length
        else:
            out.append(_REQUEST_END)

    def _absolute_form(self, target: str) -> tuple[str, int, str]:
        plain = _PLAIN_HTTP_TARGET.fullmatch(target)
        if plain is not None:
            host, port_text, rest = plain.groups()
            port = 80 if port_text is None else int(port_text)
            if len(host) <= 255 and port < 65536:
                if rest is None:
                    return host, port, "/"
                return host, port, rest if rest[0] == "/" else "/" + rest
        match = _ABSOLUTE_FORM.fullmatch(target)
        if match is None:
            if target.startswith("/") or target == "*":
                raise self._fail("not a proxy request: the target must be an absolute http:// URL")
            raise self._fail("malformed request target")
        scheme, authority, rest = match.groups()
        scheme = scheme.lower()
        if scheme != "http":
            if scheme == "https":
                raise self._fail("https:// targets must be tunnelled with CONNECT")
            raise self._fail("unsupported URL scheme")
        # Credentials in the URL would be forwarded in the clear; clients never need them.
        if "@" in authority:
            raise self._fail("userinfo in the request target")
        host_port = split_authority(authority, 80)
        if host_port is None:
            raise self._fail("invalid host or port in the request target")
        host, port = host_port
        return host, port, rest if rest.startswith("/") else "/" + rest


class ResponseParser(_Parser[ResponseEvent]):
    """Parses an upstream's answer to one request made with `request_method`.

    Events: `ResponseHead` (interim 1xx heads come first, alone), then for the final response
    `BodyData`* and `ResponseEnd`. HEAD answers, 204 and 304 have no body whatever their
    fields say; without Content-Length or chunked the body runs to EOF (`feed_eof()` ends it). A
    2xx to CONNECT, or a 101, ends the exchange and turns `tunnel` True; the bytes after the head
    are in `take_buffered()`. Every error carries status 502.

    One parser serves a whole keep-alive connection: after `ResponseEnd`, `reset(method)` arms it
    for the next exchange. Bytes that arrive before that are held (an upstream speaking out of
    turn), and parsed once reset, by the next `feed` call (`feed(b"")` is fine).
    """

    __slots__ = ("_connect", "_final", "_no_body")

    _STATUS = 502
    _WHAT = "response"
    _FAST_HEAD = _FAST_RESPONSE

    def __init__(self, request_method: str) -> None:
        super().__init__()
        self._final = False
        self._no_body = request_method == "HEAD"
        self._connect = request_method == "CONNECT"

    def reset(self, request_method: str) -> None:
        """Expect the response to a new request on the same connection."""
        if self._error is not None or self._tunnel or not self._final:
            raise RuntimeError("reset() needs a finished, non-tunnel exchange")
        self._final = False
        self._no_body = request_method == "HEAD"
        self._connect = request_method == "CONNECT"
        self._step = _Parser._step_head

    @property
    def finished(self) -> bool:
        """True once the final response ended (`ResponseEnd` emitted)."""
        return self._final

    @property
    def ended_cleanly(self) -> bool:
        """The final response ended and no byte followed it: the connection could carry
        another exchange."""
        return self._final and not self._buf

    def feed_eof(self) -> list[ResponseEvent]:
        """The upstream closed. Ends a read-until-EOF body; raises if a response was cut short."""
        if self._error is not None:
            raise self._error
        if self._step is _Parser._step_eof:
            out: list[Any] = []
            self._on_end(out, ())
            return out
        if self._final:
            return []
        if self._step is _Parser._step_head and self._head_size == 0 and not self._buf:
            message = "upstream closed the connection without a response"
        else:
            message = "upstream closed the connection in the middle of a response"
        raise self._set_error(self._fail(message))

    def _new_llhttp(self) -> _LLHttp:
        return httptools.HttpResponseParser(self._c)

    def _pause_is_switch(self, parser: _LLHttp) -> bool:
        # llhttp pauses after a 101 even without Upgrade fields; that is the switch, not an error.
        assert isinstance(parser, httptools.HttpResponseParser)
        return parser.get_status_code() == 101

    def _on_end(self, out: list[Any], trailers: Headers) -> None:
        out.append(ResponseEnd(trailers) if trailers else _RESPONSE_END)
        self._final = True
        self._step = _Parser._step_hold

    def _code(self, parser: _LLHttp) -> int:
        assert isinstance(parser, httptools.HttpResponseParser)
        return parser.get_status_code()

    def _on_head(self, out: list[Any], block: int) -> None:
        version = self._c.version
        if version != "1.1" and version != "1.0":
            raise self._fail("unsupported HTTP version")
        status = self._c.code
        assert isinstance(status, int)
        if not 100 <= status <= 599:
            raise self._fail("invalid status code")
        raw_reason = self._c.reason
        if has_ctl(raw_reason):
            raise self._fail("control character in the reason phrase")
        headers = tuple(self._c.headers)
        info = self._scan_fields(headers, block)
        te = info.transfer_encoding
        # Framing is only enforced below for a response that has a body: a HEAD answer or a
        # 304 may describe the coding of a body it does not carry.
        chunked = te is not None and _codings(te) == [b"chunked"]
        content_length = info.content_length
        reason = raw_reason.decode("latin-1")
        keep_alive = info.keep_alive(version)

        step: _Step | None = None  # None: the response ends with its head
        if status < 200 and status != 101:
            step = _Parser._step_head  # interim: the final response follows
        elif status == 101 or (self._connect and status < 300):
            self._tunnel = True
        elif not (self._no_body or status == 204 or status == 304):
            if chunked:
                step = _Parser._step_chunk_size
            elif te is not None:
                # RFC 9112 §6.3 would read such a body until EOF, but the forwarder drops
                # Transfer-Encoding and re-frames, which would corrupt a coded body.
                raise self._fail("unsupported transfer coding")
            elif content_length is None:
                step = _Parser._step_eof
                keep_alive = False  # the close delimits the body
            elif content_length:
                step = _Parser._step_length
                self._remaining = content_length
        out.append(
            ResponseHead(status, reason, headers, version, keep_alive, content_length, chunked)
        )
        if step is None:
            self._on_end(out, ())
        else:
            self._step = step
