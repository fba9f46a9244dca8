"""RequestParser on well-formed proxy requests."""

from __future__ import annotations

import pytest

from gateway.protocols import (
    BodyData,
    HttpProtocolError,
    RequestEnd,
    RequestEvent,
    RequestHead,
    RequestParser,
)
from tests.protocols.helpers import feed_chunks, merge_body, pieces, split_at


def parse(data: bytes) -> list[RequestEvent]:
    return RequestParser().feed(data)


def head_of(data: bytes) -> RequestHead:
    event = parse(data)[0]
    assert isinstance(event, RequestHead)
    return event


def test_absolute_form_get() -> None:
    events = parse(
        b"GET http://Example.com/a/b?x=1&y=2 HTTP/1.1\r\n"
        b"Host: example.com\r\nUser-Agent: curl/8\r\nAccept: */*  \r\n\r\n"
    )
    assert events == [
        RequestHead(
            method="GET",
            target="http://Example.com/a/b?x=1&y=2",
            host="Example.com",
            port=80,
            path="/a/b?x=1&y=2",
            headers=((b"Host", b"example.com"), (b"User-Agent", b"curl/8"), (b"Accept", b"*/*")),
            http_version="1.1",
            keep_alive=True,
            expect_continue=False,
            content_length=None,
            chunked=False,
        ),
        RequestEnd(),
    ]


@pytest.mark.parametrize(
    ("target", "host", "port", "path"),
    [
        ("http://a.example", "a.example", 80, "/"),
        ("http://a.example:8080", "a.example", 8080, "/"),
        ("http://a.example:/x", "a.example", 80, "/x"),
        ("http://a.example?q=1", "a.example", 80, "/?q=1"),
        ("HTTP://A.EXAMPLE/", "A.EXAMPLE", 80, "/"),
        ("http://10.0.0.1:3128/p", "10.0.0.1", 3128, "/p"),
        ("http://[2001:db8::1]/", "2001:db8::1", 80, "/"),
        ("http://[::1]:8080/x?y", "::1", 8080, "/x?y"),
        ("http://under_score.example./", "under_score.example.", 80, "/"),
    ],
)
def test_absolute_form_targets(target: str, host: str, port: int, path: str) -> None:
    head = head_of(f"GET {target} HTTP/1.1\r\n\r\n".encode())
    assert (head.target, head.host, head.port, head.path) == (target, host, port, path)


def test_post_with_content_length() -> None:
    events = parse(b"POST http://a/form HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world")
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.content_length, head.chunked) == ("POST", 11, False)
    assert events[1:] == [BodyData(b"hello world"), RequestEnd()]


def test_content_length_zero_has_no_body() -> None:
    events = parse(b"POST http://a/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert len(events) == 2
    assert events[1] == RequestEnd()


def test_chunked_body_is_decoded_with_extensions_and_trailers() -> None:
    events = parse(
        b"POST http://a/up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
        b"1;ext=1;other\r\n \r\n"
        b"A\r\n0123456789\r\n"
        b"0\r\nX-Checksum: abc \r\nX-Other:1\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.chunked, head.content_length) == (True, None)
    assert events[1:] == [
        BodyData(b"hello"),
        BodyData(b" "),
        BodyData(b"0123456789"),
        RequestEnd(trailers=((b"X-Checksum", b"abc"), (b"X-Other", b"1"))),
    ]


def test_chunked_body_without_trailers() -> None:
    events = parse(
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert events[1:] == [BodyData(b"abc"), RequestEnd()]


def test_whole_read_of_body_is_passed_through_without_copy() -> None:
    parser = RequestParser()
    parser.feed(b"PUT http://a/ HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
    read = b"x" * 65536
    [event] = parser.feed(read)
    assert isinstance(event, BodyData)
    assert event.data is read


@pytest.mark.parametrize(
    ("version", "fields", "keep_alive"),
    [
        ("1.1", b"", True),
        ("1.1", b"Connection: close\r\n", False),
        ("1.1", b"Connection: Keep-Alive, Close\r\n", False),
        ("1.1", b"Connection: keep-alive\r\n", True),
        ("1.1", b"Connection: upgrade\r\nConnection: close\r\n", False),
        ("1.1", b"Proxy-Connection: close\r\n", False),
        ("1.0", b"", False),
        ("1.0", b"Connection: keep-alive\r\n", True),
        ("1.0", b"Connection: KEEP-ALIVE\r\n", True),
        ("1.0", b"Proxy-Connection: keep-alive\r\n", True),
        ("1.0", b"Connection: keep-alive, close\r\n", False),
    ],
)
def test_keep_alive_rules(version: str, fields: bytes, keep_alive: bool) -> None:
    head = head_of(b"GET http://a/ HTTP/%s\r\n%s\r\n" % (version.encode(), fields))
    assert head.http_version == version
    assert head.keep_alive is keep_alive


@pytest.mark.parametrize(
    ("version", "fields", "expected"),
    [
        ("1.1", b"Expect: 100-continue\r\n", True),
        ("1.1", b"Expect: 100-Continue\r\n", True),
        ("1.1", b"", False),
        ("1.1", b"Expect: something-else\r\n", False),
        ("1.0", b"Expect: 100-continue\r\n", False),
    ],
)
def test_expect_continue(version: str, fields: bytes, expected: bool) -> None:
    head = head_of(
        b"POST http://a/ HTTP/%s\r\nContent-Length: 1\r\n%s\r\n" % (version.encode(), fields)
    )
    assert head.expect_continue is expected


PIPELINE = (
    b"GET http://a/1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST http://a/2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    b"\r\n"  # a stray CRLF between requests is tolerated
    b"PUT http://b:81/3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\nT: v\r\n\r\n"
    b"HEAD http://c/4 HTTP/1.0\r\n\r\n"
)


def test_pipelined_requests_come_out_in_order() -> None:
    events = parse(PIPELINE)
    kinds = [(e.method, e.path) if isinstance(e, RequestHead) else type(e).__name__ for e in events]
    assert kinds == [
        ("GET", "/1"),
        "RequestEnd",
        ("POST", "/2"),
        "BodyData",
        "RequestEnd",
        ("PUT", "/3"),
        "BodyData",
        "RequestEnd",
        ("HEAD", "/4"),
        "RequestEnd",
    ]
    assert events[6] == BodyData(b"xy")
    assert events[7] == RequestEnd(trailers=((b"T", b"v"),))


def test_byte_by_byte_equals_whole() -> None:
    whole = parse(PIPELINE)
    assert merge_body(feed_chunks(RequestParser(), pieces(PIPELINE, 1))) == whole


def test_every_two_way_split_equals_whole() -> None:
    whole = parse(PIPELINE)
    for cut in range(len(PIPELINE) + 1):
        assert merge_body(feed_chunks(RequestParser(), split_at(PIPELINE, [cut]))) == whole, cut


def test_every_three_way_split_of_a_chunked_request() -> None:
    data = (
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    )
    whole = parse(data)
    for i in range(len(data)):
        for j in range(i, len(data), 3):
            assert merge_body(feed_chunks(RequestParser(), split_at(data, [i, j]))) == whole


def test_connect_stops_parsing_and_keeps_tunnel_bytes() -> None:
    parser = RequestParser()
    hello = b"\x16\x03\x01\x00\x05hello GET http://not-parsed/ HTTP/1.1\r\n\r\n"
    events = parser.feed(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"Proxy-Authorization: Basic dTpw\r\n\r\n" + hello
    )
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.host, head.port, head.path) == ("CONNECT", "example.com", 443, "")
    assert events[1:] == [RequestEnd()]
    assert parser.tunnel
    assert parser.feed(b"more") == []
    assert parser.take_buffered() == hello + b"more"
    assert parser.take_buffered() == b""
    assert parser.feed_eof() == []


def test_connect_split_anywhere_keeps_every_tunnel_byte() -> None:
    data = b"CONNECT [2001:db8::2]:8443 HTTP/1.1\r\nContent-Length: 0\r\n\r\nTUNNEL\r\n\r\n"
    for cut in range(len(data) + 1):
        parser = RequestParser()
        events = feed_chunks(parser, split_at(data, [cut]))
        head = events[0]
        assert isinstance(head, RequestHead)
        assert (head.host, head.port) == ("2001:db8::2", 8443)
        assert parser.take_buffered() == b"TUNNEL\r\n\r\n"


def test_tunnel_buffer_is_capped() -> None:
    parser = RequestParser()
    parser.feed(b"CONNECT a:1 HTTP/1.1\r\n\r\n")
    parser.feed(b"x" * 65536)
    with pytest.raises(HttpProtocolError):
        parser.feed(b"x")


def test_connect_ipv6_authority() -> None:
    head = head_of(b"CONNECT [::ffff:10.0.0.1]:443 HTTP/1.1\r\n\r\n")
    assert (head.host, head.port) == ("::ffff:10.0.0.1", 443)


def test_leading_empty_lines_are_ignored() -> None:
    parser = RequestParser()
    assert parser.feed(b"\r\n\r") == []
    events = parser.feed(b"\nGET http://a/ HTTP/1.1\r\n\r\n")
    assert isinstance(events[0], RequestHead)


def test_unusual_but_valid_fields() -> None:
    head = head_of(
        b"GET http://a/ HTTP/1.1\r\nX-Empty:\r\nX-Tight:v\r\nX-Obs-Text: caf\xe9\r\n"
        b"x-lower: \tpadded\t \r\n\r\n"
    )
    assert head.headers == (
        (b"X-Empty", b""),
        (b"X-Tight", b"v"),
        (b"X-Obs-Text", b"caf\xe9"),
        (b"x-lower", b"padded"),
    )


def test_upgrade_request_is_parsed_as_an_ordinary_request() -> None:
    parser = RequestParser()
    events = parser.feed(
        b"GET http://a/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"GET http://a/next HTTP/1.1\r\n\r\n"
    )
    assert [type(e).__name__ for e in events] == [
        "RequestHead",
        "RequestEnd",
        "RequestHead",
        "RequestEnd",
    ]
    assert not parser.tunnel


def test_feed_eof_between_requests_is_clean() -> None:
    parser = RequestParser()
    parser.feed(b"GET http://a/ HTTP/1.1\r\n\r\n\r\n")
    assert parser.feed_eof() == []


@pytest.mark.parametrize(
    "partial",
    [
        b"GET http://a/ HTTP/1.1\r\nHost",
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
        b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
    ],
)
def test_feed_eof_mid_request_raises_400(partial: bytes) -> None:
    parser = RequestParser()
    parser.feed(partial)
    with pytest.raises(HttpProtocolError) as info:
        parser.feed_eof()
    assert info.value.status == 400


def test_error_is_sticky() -> None:
    parser = RequestParser()
    with pytest.raises(HttpProtocolError) as first:
        parser.feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(HttpProtocolError) as second:
        parser.feed(b"GET http://a/ HTTP/1.1\r\n\r\n")
    assert second.value is first.value


def test_bytearray_input() -> None:
    events = RequestParser().feed(
        bytearray(b"POST http://a/ HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
    )
    assert events[1:] == [BodyData(b"ok"), RequestEnd()]
    body = events[1]
    assert isinstance(body, BodyData)
    assert type(body.data) is bytes


def test_http10_with_transfer_encoding_is_not_kept_alive() -> None:
    # RFC 9112 §6.1: suspect framing, so the connection closes after the message.
    events = parse(
        b"POST http://a/ HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.chunked, head.keep_alive) == (True, False)
    assert events[1:] == [BodyData(b"x"), RequestEnd()]
