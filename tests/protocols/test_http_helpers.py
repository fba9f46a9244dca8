"""Serializers, error responses and the forwarder's header helpers."""

from __future__ import annotations

import base64

import pytest

from gateway.protocols import (
    LAST_CHUNK,
    BadCredentials,
    BodyData,
    HttpProtocolError,
    RequestHead,
    RequestParser,
    ResponseEnd,
    ResponseHead,
    ResponseParser,
    encode_chunk,
    error_response,
    parse_basic_auth,
    serialize_request_head,
    serialize_response_head,
    split_proxy_headers,
)


def test_serialize_request_head() -> None:
    head = serialize_request_head("GET", "http://a/x?y", [(b"Host", b"a"), (b"Accept", b"*/*")])
    assert head == b"GET http://a/x?y HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"


def test_serialize_response_head() -> None:
    assert serialize_response_head(204, "No Content", ()) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert (
        serialize_response_head(200, "", [(b"A", b"b")], http_version="1.0")
        == b"HTTP/1.0 200 \r\nA: b\r\n\r\n"
    )


@pytest.mark.parametrize(
    "headers",
    [
        [(b"X", b"a\r\nInjected: yes")],
        [(b"X", b"a\nb")],
        [(b"X", b"a\rb")],
        [(b"X\r\nY", b"v")],
    ],
)
def test_serializers_refuse_line_injection(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_request_head("GET", "/", headers)
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_response_head(200, "OK", headers)


def test_request_line_parts_are_checked() -> None:
    with pytest.raises(ValueError, match="space"):
        serialize_request_head("GET", "/a b", ())
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_request_head("GET", "/a\r\nX:y", ())
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_response_head(200, "OK\r\nX: y", ())


def test_chunks_round_trip_through_the_parser() -> None:
    body = encode_chunk(b"hello") + encode_chunk(b"") + encode_chunk(b"x" * 300) + LAST_CHUNK
    assert encode_chunk(b"x" * 300).startswith(b"12c\r\n")
    events = ResponseParser("GET").feed(
        serialize_response_head(200, "OK", [(b"Transfer-Encoding", b"chunked")]) + body
    )
    assert events[1:] == [BodyData(b"hello"), BodyData(b"x" * 300), ResponseEnd()]


def test_error_response() -> None:
    raw = error_response(
        407,
        proxy_status="proxygate; error=proxy_auth_required",
        extra_headers=[(b"Proxy-Authenticate", b'Basic realm="proxygate"')],
    )
    parser = ResponseParser("GET")
    events = parser.feed(raw)
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason, head.keep_alive) == (
        407,
        "Proxy Authentication Required",
        False,
    )
    assert dict(head.headers) == {
        b"Content-Type": b"text/plain; charset=utf-8",
        b"Content-Length": b"34",
        b"Connection": b"close",
        b"Proxy-Status": b"proxygate; error=proxy_auth_required",
        b"Proxy-Authenticate": b'Basic realm="proxygate"',
    }
    assert events[1:] == [BodyData(b"407 Proxy Authentication Required\n"), ResponseEnd()]


def test_error_response_custom_body_and_unknown_status() -> None:
    raw = error_response(599, body="caf\u00e9")
    assert raw.startswith(b"HTTP/1.1 599 Unknown\r\n")
    assert raw.endswith(b"\r\n\r\ncaf\xc3\xa9")
    assert b"Content-Length: 5\r\n" in raw
    assert b"Proxy-Status" not in raw


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "Bad Request"),
        (414, "URI Too Long"),
        (431, "Request Header Fields Too Large"),
        (502, "Bad Gateway"),
        (504, "Gateway Timeout"),
        (505, "HTTP Version Not Supported"),
    ],
)
def test_error_response_reason_phrases(status: int, reason: str) -> None:
    assert error_response(status).startswith(f"HTTP/1.1 {status} {reason}\r\n".encode())


def test_error_response_refuses_injection() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        error_response(502, proxy_status="x\r\nSet-Cookie: a=b")


# --- split_proxy_headers -----------------------------------------------------------------


def test_split_proxy_headers() -> None:
    headers = (
        (b"Host", b"example.com"),
        (b"Connection", b"keep-alive, X-Custom-Hop, Content-Length"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Proxy-Authorization", b"Basic dTpw"),
        (b"Trailer", b"X-Checksum"),
        (b"x-custom-hop", b"dropped"),
        (b"X-Proxy-Pool", b"residential"),
        (b"x-proxy-session", b"abc123"),
        (b"X-PROXY-COUNTRY", b"DE"),
        (b"X-Proxy-Unknown", b"dropped too"),
        (b"Content-Length", b"10"),
        (b"Accept", b"*/*"),
        (b"X-Proxyish", b"kept"),
    )
    result = split_proxy_headers(headers)
    assert result.headers == (
        (b"Host", b"example.com"),
        (b"Content-Length", b"10"),
        (b"Accept", b"*/*"),
        (b"X-Proxyish", b"kept"),
    )
    assert (result.pool, result.session, result.country) == ("residential", "abc123", "DE")
    assert result.proxy_authorization == b"Basic dTpw"
    assert "dTpw" not in repr(result)


def test_split_proxy_headers_without_extras() -> None:
    result = split_proxy_headers(((b"Host", b"a"), (b"Cookie", b"c=1")))
    assert result.headers == ((b"Host", b"a"), (b"Cookie", b"c=1"))
    assert (result.pool, result.session, result.country, result.proxy_authorization) == (
        None,
        None,
        None,
        None,
    )


def test_split_proxy_headers_on_parsed_request() -> None:
    head = RequestParser().feed(
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n"
        b"X-Proxy-Pool: dc\r\nUser-Agent: t\r\n\r\n"
    )[0]
    assert isinstance(head, RequestHead)
    result = split_proxy_headers(head.headers)
    assert result.headers == ((b"Host", b"a"), (b"User-Agent", b"t"))
    assert result.pool == "dc"


@pytest.mark.parametrize("name", [b"X-Proxy-Pool", b"x-proxy-session", b"Proxy-Authorization"])
def test_split_proxy_headers_refuses_repeated_routing_fields(name: bytes) -> None:
    with pytest.raises(HttpProtocolError) as info:
        split_proxy_headers(((name, b"secret-1"), (name.upper(), b"secret-2")))
    assert info.value.status == 400
    assert "secret" not in str(info.value)


# --- parse_basic_auth --------------------------------------------------------------------


def basic(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (basic(b"user:pass"), ("user", "pass")),
        (basic(b"user:pa:ss:"), ("user", "pa:ss:")),
        (basic(b":"), ("", "")),
        (basic(b"user-country-de-session-1:"), ("user-country-de-session-1", "")),
        (basic("j\u00f6rg:p\u00e4ss".encode()), ("j\u00f6rg", "p\u00e4ss")),
        (b"basic   " + base64.b64encode(b"a:b") + b"  ", ("a", "b")),
        (b"BASIC " + base64.b64encode(b"ab:c").rstrip(b"="), ("ab", "c")),
        ("Basic " + base64.b64encode(b"s:t").decode(), ("s", "t")),
    ],
)
def test_parse_basic_auth(value: bytes | str, expected: tuple[str, str]) -> None:
    assert parse_basic_auth(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"Basic",
        b"Basic ",
        b"Bearer abc.def",
        b"Digest username=x",
        b"Basic !!!!",
        b"Basic dXNlcjpwYXNz=x",
        b"Basic a",
        b"Basic " + base64.b64encode(b"no-colon"),
        b"Basic " + base64.b64encode(b"\xff\xfe:\xfd"),
        b"Basic " + base64.b64encode(b"user:pa\x00ss"),
        b"Basic " + base64.b64encode(b"us\ner:pass"),
        b"Basic " + b"A" * 5000,
        "Basic d\u00e9j\u00e0",
    ],
)
def test_parse_basic_auth_refuses(value: bytes | str) -> None:
    with pytest.raises(BadCredentials) as info:
        parse_basic_auth(value)
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    secret = text.partition(" ")[2].strip()
    if len(secret) > 3:
        assert secret not in str(info.value)
