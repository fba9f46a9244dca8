"""Property tests: every parser either produces well-formed events or raises its own error type,
whatever the bytes and however they are split; serialized heads parse back to what was written."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.protocols import (
    LAST_CHUNK,
    BodyData,
    HttpProtocolError,
    RequestEnd,
    RequestHead,
    RequestParser,
    ResponseEnd,
    ResponseHead,
    ResponseParser,
    Socks4Server,
    Socks5Server,
    SocksProtocolError,
    encode_chunk,
    serialize_request_head,
    serialize_response_head,
)
from tests.protocols.helpers import merge_body, split_at

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

raw_chunks = st.lists(st.binary(max_size=80), max_size=12)
cuts = st.lists(st.integers(min_value=0, max_value=1500), max_size=6)


def stitched(fragments: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Byte strings built from protocol fragments with random bytes in between, so the fuzzing
    reaches bodies, trailers and tunnels instead of dying on the first byte."""
    piece = st.one_of(st.sampled_from(fragments), st.binary(max_size=4))
    return st.lists(piece, max_size=24).map(b"".join)


REQUEST_FRAGMENTS = [
    b"GET http://a.example/x HTTP/1.1\r\n",
    b"POST http://a:81/ HTTP/1.0\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\n",
    b"HEAD http://[::1]/ HTTP/1.1\r\n",
    b"GET / HTTP/1.1\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n",
    b"Expect: 100-continue\r\n",
    b"Host: a\r\n",
    b"X: y\r\n",
    b"\r\n",
    b"\r\n\r\n",
    b"3\r\nabc\r\n",
    b"1;e=v\r\n",
    b"0\r\n",
    b"T: 1\r\n",
    b"abc",
]
RESPONSE_FRAGMENTS = [
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.0 200 OK\r\n",
    b"HTTP/1.1 100 Continue\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n",
    b"HTTP/1.1 204 No Content\r\n",
    b"HTTP/1.1 304 Not Modified\r\n",
    b"HTTP/1.1 407 Proxy Authentication Required\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: keep-alive\r\n",
    b"X: y\r\n",
    b"\r\n",
    b"\r\n\r\n",
    b"3\r\nabc\r\n",
    b"0\r\n",
    b"T: 1\r\n",
    b"abc",
]
SOCKS5_FRAGMENTS = [
    b"\x05\x01\x00",
    b"\x05\x02\x00\x02",
    b"\x05\x01\x02",
    b"\x01\x01u\x01p",
    b"\x01\x00\x00",
    b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    b"\x05\x01\x00\x03\x01a\x00\x50",
    b"\x05\x01\x00\x04" + bytes(16) + b"\x00\x50",
    b"\x05\x02\x00\x01",
    b"tunnel",
]
SOCKS4_FRAGMENTS = [
    b"\x04\x01\x00\x50",
    b"\x7f\x00\x00\x01",
    b"\x00\x00\x00\x01",
    b"user",
    b"\x00",
    b"example.com",
    b"\x04\x02",
    b"tunnel",
]


def run(
    make: Callable[[], Any], chunks: Sequence[bytes], error: type[Exception], eof: bool
) -> tuple[list[Any], object, bytes]:
    """(events, error code or None, bytes left buffered). Any other exception escapes."""
    parser = make()
    events: list[Any] = []
    try:
        for chunk in chunks:
            events.extend(parser.feed(chunk))
        if eof:
            events.extend(parser.feed_eof())
    except error as exc:
        code = getattr(exc, "status", None) or getattr(exc, "reply_code", None)
        assert code is not None
        return events, code, b""
    return events, None, parser.take_buffered()


def check_request_grammar(events: list[Any]) -> None:
    expect_head = True
    head: RequestHead | None = None
    received = 0
    for event in events:
        if expect_head:
            assert isinstance(event, RequestHead)
            assert head is None or head.method != "CONNECT", "nothing may follow a CONNECT"
            head, received, expect_head = event, 0, False
            assert 0 < head.port < 65536
            assert head.method == "CONNECT" or head.path.startswith("/")
        elif isinstance(event, BodyData):
            assert event.data
            received += len(event.data)
        else:
            assert isinstance(event, RequestEnd)
            assert head is not None
            if not head.chunked:
                assert received == (head.content_length or 0)
            expect_head = True


def check_response_grammar(events: list[Any]) -> None:
    finals = [e for e in events if isinstance(e, ResponseHead) and not 100 <= e.status < 200]
    finals += [e for e in events if isinstance(e, ResponseHead) and e.status == 101]
    assert len(finals) <= 1
    ends = [e for e in events if isinstance(e, ResponseEnd)]
    assert len(ends) <= 1
    if ends:
        assert events[-1] is ends[0]
    body = sum(len(e.data) for e in events if isinstance(e, BodyData))
    if ends and finals and finals[0].content_length is not None and not finals[0].chunked:
        assert body in (0, finals[0].content_length)


# --- never anything but the typed error --------------------------------------------------


@FUZZ
@given(raw_chunks)
def test_request_parser_random_bytes(chunks: list[bytes]) -> None:
    events, _, _ = run(RequestParser, chunks, HttpProtocolError, eof=True)
    check_request_grammar(events)


@FUZZ
@given(stitched(REQUEST_FRAGMENTS), cuts)
# Found by this test: a message that closes the connection, parsed in pieces, made the next
# one an error that the same bytes fed whole did not.
@example(b"POST http://a:81/ HTTP/1.0\r\n\r\nGET http://a.example/x HTTP/1.1\r\n", [1])
def test_request_parser_fragments_any_split(data: bytes, at: list[int]) -> None:
    whole, whole_error, whole_rest = run(RequestParser, [data], HttpProtocolError, eof=False)
    split, split_error, split_rest = run(
        RequestParser, split_at(data, at), HttpProtocolError, eof=False
    )
    assert split_error == whole_error
    if whole_error is None:
        check_request_grammar(whole)
        assert merge_body(split) == whole
        assert split_rest == whole_rest


@FUZZ
@given(st.sampled_from(["GET", "HEAD", "CONNECT", "POST"]), raw_chunks)
def test_response_parser_random_bytes(method: str, chunks: list[bytes]) -> None:
    events, _, _ = run(lambda: ResponseParser(method), chunks, HttpProtocolError, eof=True)
    check_response_grammar(events)


@FUZZ
@given(st.sampled_from(["GET", "HEAD", "CONNECT"]), stitched(RESPONSE_FRAGMENTS), cuts)
def test_response_parser_fragments_any_split(method: str, data: bytes, at: list[int]) -> None:
    def make() -> ResponseParser:
        return ResponseParser(method)

    whole, whole_error, whole_rest = run(make, [data], HttpProtocolError, eof=False)
    split, split_error, split_rest = run(make, split_at(data, at), HttpProtocolError, eof=False)
    assert split_error == whole_error
    if whole_error is None:
        check_response_grammar(whole)
        assert merge_body(split) == whole
        assert split_rest == whole_rest


@FUZZ
@given(st.booleans(), raw_chunks)
def test_socks5_random_bytes(auth_required: bool, chunks: list[bytes]) -> None:
    run(lambda: Socks5Server(auth_required), chunks, SocksProtocolError, eof=False)


@FUZZ
@given(st.booleans(), stitched(SOCKS5_FRAGMENTS), cuts)
def test_socks5_fragments_any_split(auth_required: bool, data: bytes, at: list[int]) -> None:
    def make() -> Socks5Server:
        return Socks5Server(auth_required)

    whole = run(make, [data], SocksProtocolError, eof=False)
    split = run(make, split_at(data, at), SocksProtocolError, eof=False)
    assert split[1] == whole[1]
    if whole[1] is None:
        assert split == whole


@FUZZ
@given(raw_chunks)
def test_socks4_random_bytes(chunks: list[bytes]) -> None:
    run(Socks4Server, chunks, SocksProtocolError, eof=False)


@FUZZ
@given(stitched(SOCKS4_FRAGMENTS), cuts)
def test_socks4_fragments_any_split(data: bytes, at: list[int]) -> None:
    whole = run(Socks4Server, [data], SocksProtocolError, eof=False)
    split = run(Socks4Server, split_at(data, at), SocksProtocolError, eof=False)
    assert split[1] == whole[1]
    if whole[1] is None:
        assert split == whole


# --- round trips -------------------------------------------------------------------------

_LABEL = "abcdefghijklmnopqrstuvwxyz0123456789-"
_PCHAR = "ABCXYZabcxyz0189._~!$&'()*+,;=:@-"
_TCHAR = "!#$%&'*+.^_`|~-ABCXYZabcxyz0189"
_VALUE_CHARS = [chr(c) for c in (*range(0x21, 0x7F), *range(0x80, 0x100))] + [" ", "\t"]

# Plain text strategies: hypothesis' from_regex is an order of magnitude slower to draw from.
hostnames = st.one_of(
    st.lists(st.text(_LABEL, min_size=1, max_size=10), min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
paths = st.tuples(
    st.lists(st.text(_PCHAR, max_size=8), max_size=4).map(lambda s: "".join("/" + p for p in s)),
    st.one_of(st.just(""), st.text(_PCHAR + "/?", max_size=10).map(lambda q: "?" + q)),
).map("".join)
field_names = st.text(_TCHAR, min_size=1, max_size=12).map(lambda s: b"X-" + s.encode())
field_values = st.text(alphabet=_VALUE_CHARS, max_size=24).map(
    lambda s: s.strip(" \t").encode("latin-1")
)
field_lists = st.lists(st.tuples(field_names, field_values), max_size=8)


@FUZZ
@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"]),
    hostnames,
    st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
    paths,
    field_lists,
    st.binary(max_size=200),
    st.booleans(),
)
def test_request_round_trip(
    method: str,
    host: str,
    port: int | None,
    path: str,
    fields: list[tuple[bytes, bytes]],
    body: bytes,
    chunked: bool,
) -> None:
    authority = host if port is None else f"{host}:{port}"
    target = f"http://{authority}{path}"
    if chunked:
        fields = [*fields, (b"Transfer-Encoding", b"chunked")]
        payload = encode_chunk(body[:50]) + encode_chunk(body[50:]) + LAST_CHUNK
    elif body:
        fields = [*fields, (b"Content-Length", b"%d" % len(body))]
        payload = body
    else:
        payload = b""
    events = RequestParser().feed(serialize_request_head(method, target, fields) + payload)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.headers) == (method, target, tuple(fields))
    assert head.host == host.strip("[]")
    assert head.port == (80 if port is None else port)
    assert head.path == (path if path.startswith("/") else "/" + path)
    assert (head.http_version, head.keep_alive, head.expect_continue) == ("1.1", True, False)
    assert head.chunked is chunked
    assert b"".join(e.data for e in events if isinstance(e, BodyData)) == body
    assert isinstance(events[-1], RequestEnd)


@FUZZ
@given(
    st.integers(min_value=200, max_value=599).filter(lambda s: s not in (204, 304)),
    st.text(alphabet=_VALUE_CHARS, max_size=30).map(lambda s: s.strip(" \t")),
    field_lists,
    st.binary(max_size=100),
)
def test_response_round_trip(
    status: int, reason: str, fields: list[tuple[bytes, bytes]], body: bytes
) -> None:
    fields = [*fields, (b"Content-Length", b"%d" % len(body))]
    events = ResponseParser("GET").feed(serialize_response_head(status, reason, fields) + body)
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason, head.headers) == (status, reason, tuple(fields))
    assert b"".join(e.data for e in events if isinstance(e, BodyData)) == body
    assert isinstance(events[-1], ResponseEnd)
