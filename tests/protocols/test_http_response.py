"""ResponseParser: framing rules, interim responses, EOF bodies, CONNECT, keep-alive reuse."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway.protocols import (
    BodyData,
    HttpProtocolError,
    ResponseEnd,
    ResponseHead,
    ResponseParser,
)
from tests.protocols.helpers import feed_chunks, merge_body, pieces, split_at


def kinds(events: Sequence[object]) -> list[object]:
    return [e.status if isinstance(e, ResponseHead) else e for e in events]


def test_content_length_body() -> None:
    events = ResponseParser("GET").feed(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello"
    )
    assert events == [
        ResponseHead(
            status=200,
            reason="OK",
            headers=((b"Content-Length", b"5"), (b"Server", b"x")),
            http_version="1.1",
            keep_alive=True,
            content_length=5,
            chunked=False,
        ),
        BodyData(b"hello"),
        ResponseEnd(),
    ]


def test_head_response_has_no_body_despite_content_length() -> None:
    parser = ResponseParser("HEAD")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert kinds(events) == [200, ResponseEnd()]
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert head.content_length == 1234
    assert parser.finished


def test_head_response_with_chunked_has_no_body() -> None:
    events = ResponseParser("HEAD").feed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    )
    assert kinds(events) == [200, ResponseEnd()]


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    events = ResponseParser("GET").feed(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    assert kinds(events) == [status, ResponseEnd()]


def test_interim_responses_then_final() -> None:
    parser = ResponseParser("POST")
    events = parser.feed(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    assert kinds(events) == [100, 103, 201, BodyData(b"ok"), ResponseEnd()]
    assert isinstance(events[1], ResponseHead)
    assert events[1].reason == "Early Hints"


def test_interim_response_alone_leaves_parser_waiting() -> None:
    parser = ResponseParser("POST")
    assert kinds(parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n")) == [100]
    assert not parser.finished
    with pytest.raises(HttpProtocolError) as info:
        parser.feed_eof()
    assert info.value.status == 502


def test_chunked_response_with_trailers() -> None:
    events = ResponseParser("GET").feed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n"
    )
    assert merge_body(events)[1:] == [
        BodyData(b"Wikipedia in \r\n\r\nchunks."),
        ResponseEnd(trailers=((b"Expires", b"never"),)),
    ]
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert head.chunked


def test_read_until_eof() -> None:
    parser = ResponseParser("GET")
    events = parser.feed(b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nsome ")
    events += parser.feed(b"body")
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert head.keep_alive is False
    assert events[1:] == [BodyData(b"some "), BodyData(b"body")]
    assert parser.feed_eof() == [ResponseEnd()]
    assert parser.finished


def test_read_until_eof_http11_is_not_keep_alive() -> None:
    head = ResponseParser("GET").feed(b"HTTP/1.1 200 OK\r\n\r\n")[0]
    assert isinstance(head, ResponseHead)
    assert head.keep_alive is False


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"",
    ],
)
def test_cut_short_is_502(partial: bytes) -> None:
    parser = ResponseParser("GET")
    parser.feed(partial)
    with pytest.raises(HttpProtocolError) as info:
        parser.feed_eof()
    assert info.value.status == 502


@pytest.mark.parametrize(
    ("version", "fields", "keep_alive"),
    [
        (b"1.1", b"", True),
        (b"1.1", b"Connection: close\r\n", False),
        (b"1.0", b"", False),
        (b"1.0", b"Connection: keep-alive\r\n", True),
    ],
)
def test_response_keep_alive(version: bytes, fields: bytes, keep_alive: bool) -> None:
    head = ResponseParser("GET").feed(
        b"HTTP/%s 200 OK\r\nContent-Length: 0\r\n%s\r\n" % (version, fields)
    )[0]
    assert isinstance(head, ResponseHead)
    assert head.keep_alive is keep_alive


def test_connect_2xx_switches_to_tunnel_with_trailing_bytes() -> None:
    parser = ResponseParser("CONNECT")
    events = parser.feed(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03tls")
    assert kinds(events) == [200, ResponseEnd()]
    assert parser.tunnel
    parser.feed(b"more")
    assert parser.take_buffered() == b"\x16\x03\x03tlsmore"
    assert parser.feed_eof() == []


def test_connect_refused_has_a_body() -> None:
    parser = ResponseParser("CONNECT")
    events = parser.feed(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 4\r\n\r\ndeny"
    )
    assert kinds(events) == [407, BodyData(b"deny"), ResponseEnd()]
    assert not parser.tunnel


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_101_switches_to_tunnel(head: bytes) -> None:
    parser = ResponseParser("GET")
    assert kinds(parser.feed(head + b"frames")) == [101, ResponseEnd()]
    assert parser.tunnel
    assert parser.take_buffered() == b"frames"


def test_every_split_of_a_connect_response() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n\r\n\r\nTUNNEL"
    for cut in range(len(data) + 1):
        parser = ResponseParser("CONNECT")
        assert kinds(feed_chunks(parser, split_at(data, [cut]))) == [100, 200, ResponseEnd()]
        assert parser.take_buffered() == b"\r\n\r\nTUNNEL"


def test_byte_by_byte_equals_whole() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n"
    )
    whole = ResponseParser("GET").feed(data)
    assert merge_body(feed_chunks(ResponseParser("GET"), pieces(data, 1))) == merge_body(whole)


def test_reset_for_the_next_exchange_on_a_keep_alive_connection() -> None:
    parser = ResponseParser("GET")
    first = parser.feed(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"
    )
    assert kinds(first) == [200, BodyData(b"a"), ResponseEnd()]
    parser.reset("GET")
    assert kinds(parser.feed(b"")) == [200, BodyData(b"b"), ResponseEnd()]
    parser.reset("HEAD")
    assert kinds(parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")) == [
        200,
        ResponseEnd(),
    ]


def test_reset_needs_a_finished_exchange() -> None:
    parser = ResponseParser("GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(RuntimeError):
        parser.reset("GET")


MALFORMED = [
    ("status-too-short", b"HTTP/1.1 20 OK\r\n\r\n"),
    ("status-out-of-range", b"HTTP/1.1 999 Weird\r\n\r\n"),
    ("status-600", b"HTTP/1.1 600 Weird\r\n\r\n"),
    ("http2", b"HTTP/2 200 OK\r\n\r\n"),
    ("http-2.0", b"HTTP/2.0 200 OK\r\n\r\n"),
    ("not-http", b"SSH-2.0-OpenSSH_9.6\r\n"),
    ("control-in-reason", b"HTTP/1.1 200 O\x01K\r\n\r\n"),
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("cl-duplicate", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"),
    ("te-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"),
    ("te-chunked-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
    ("te-gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"),
    ("nul-in-value", b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n"),
    ("bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n"),
    ("status-line-9k", b"HTTP/1.1 200 " + b"O" * 9000 + b"\r\n\r\n"),
    ("field-9k", b"HTTP/1.1 200 OK\r\nX: " + b"v" * 9000 + b"\r\n\r\n"),
    ("header-block-70k", b"HTTP/1.1 200 OK\r\n" + b"X: " + b"v" * 8000 + b"\r\n" + b"Y: " * 30000),
    ("101-headers", b"HTTP/1.1 200 OK\r\n" + b"X: v\r\n" * 101 + b"\r\n"),
]


@pytest.mark.parametrize("data", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_responses_are_502(data: bytes) -> None:
    for chunks in ([data], pieces(data, 5)):
        with pytest.raises(HttpProtocolError) as info:
            feed_chunks(ResponseParser("GET"), chunks)
        assert info.value.status == 502


def test_data_after_a_finished_response_is_held_and_capped() -> None:
    parser = ResponseParser("GET")
    parser.feed(b"HTTP/1.1 204 No Content\r\n\r\nextra")
    assert parser.finished
    parser.feed(b"x" * 60000)
    with pytest.raises(HttpProtocolError) as info:
        parser.feed(b"x" * 10000)
    assert info.value.status == 502


def test_http10_chunked_response_is_not_kept_alive() -> None:
    events = ResponseParser("GET").feed(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.chunked, head.keep_alive) == (True, False)


def test_empty_content_length_response_and_eof_after_it() -> None:
    parser = ResponseParser("GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert kinds(events) == [200, ResponseEnd()]
    assert parser.feed_eof() == []
