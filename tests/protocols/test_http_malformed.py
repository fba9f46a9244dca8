"""RequestParser refuses every malformed or non-proxy request with the right status.

Each case is also fed in 3-byte pieces: streaming must not change the verdict. The comment on a
group says whether llhttp or our own code catches it.
"""

from __future__ import annotations

import pytest

from gateway.protocols import HttpProtocolError, RequestParser
from tests.protocols.helpers import feed_chunks, pieces

R = b"GET http://a/ HTTP/1.1\r\n"
P = b"POST http://a/ HTTP/1.1\r\n"
CHUNKED = P + b"Transfer-Encoding: chunked\r\n\r\n"
TE = b"Transfer-Encoding: "


def fields(template: bytes, count: int) -> bytes:
    return b"".join(template % i for i in range(count))


CASES: list[tuple[str, bytes, int]] = [
    # --- framing, caught by llhttp ---
    ("cl-and-te", P + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("te-and-cl", P + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    ("cl-duplicate-differing", P + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    ("cl-duplicate-same", P + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
    ("cl-list", P + b"Content-Length: 5, 5\r\n\r\n", 400),
    ("cl-negative", P + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-plus", P + b"Content-Length: +1\r\n\r\n", 400),
    ("cl-alpha", P + b"Content-Length: abc\r\n\r\n", 400),
    ("cl-hex", P + b"Content-Length: 0x10\r\n\r\n", 400),
    ("cl-empty", P + b"Content-Length:\r\n\r\n", 400),
    ("cl-overflow", P + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    ("te-gzip", P + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    ("te-identity", P + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te-chunked-then-gzip", P + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("te-chunked-twice", P + TE + b"chunked\r\n" + TE + b"chunked\r\n\r\n", 400),
    ("te-chunked-params", P + b"Transfer-Encoding: chunked;q=1\r\n\r\n", 400),
    ("te-empty", P + b"Transfer-Encoding:\r\n\r\n", 400),
    # --- framing, ours: llhttp accepts a final chunked under another coding ---
    ("te-gzip-chunked", P + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("te-gzip-line-chunked-line", P + TE + b"gzip\r\n" + TE + b"chunked\r\n\r\n", 501),
    # --- chunked body, ours (llhttp never sees bodies) ---
    ("chunk-size-alpha", CHUNKED + b"zz\r\n", 400),
    ("chunk-size-space", CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-leading-space", CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-negative", CHUNKED + b"-5\r\n", 400),
    ("chunk-size-0x", CHUNKED + b"0x5\r\n", 400),
    ("chunk-size-plus", CHUNKED + b"+5\r\n", 400),
    ("chunk-size-underscore", CHUNKED + b"1_0\r\n", 400),
    ("chunk-size-empty", CHUNKED + b"\r\n", 400),
    ("chunk-size-empty-ext", CHUNKED + b";a=b\r\n", 400),
    ("chunk-size-17-digits", CHUNKED + b"10000000000000000\r\n", 400),
    ("chunk-size-bare-lf", CHUNKED + b"5\nhello\r\n", 400),
    ("chunk-ext-nul", CHUNKED + b"5;a\x00\r\nhello\r\n", 400),
    ("chunk-ext-bare-cr", CHUNKED + b"5;a\rb\r\nhello\r\n", 400),
    ("chunk-too-long-data", CHUNKED + b"2\r\nabc\r\n", 400),
    ("chunk-line-too-long", CHUNKED + b"1;" + b"e" * 5000, 400),
    ("trailer-obs-fold", CHUNKED + b"0\r\nT: a\r\n folded\r\n\r\n", 400),
    ("trailer-space-before-colon", CHUNKED + b"0\r\nT : a\r\n\r\n", 400),
    ("trailer-no-colon", CHUNKED + b"0\r\nnocolon\r\n\r\n", 400),
    ("trailer-nul", CHUNKED + b"0\r\nT: a\x00b\r\n\r\n", 400),
    ("trailer-bare-cr", CHUNKED + b"0\r\nT: a\rb\r\n\r\n", 400),
    # --- field syntax, caught by llhttp ---
    ("obs-fold-space", R + b"X: a\r\n folded\r\n\r\n", 400),
    ("obs-fold-tab", R + b"X: a\r\n\tfolded\r\n\r\n", 400),
    ("space-before-colon", R + b"Host : a\r\n\r\n", 400),
    ("tab-before-colon", R + b"Host\t: a\r\n\r\n", 400),
    ("nul-in-value", R + b"X: a\x00b\r\n\r\n", 400),
    ("bare-cr-in-value", R + b"X: a\rb\r\n\r\n", 400),
    ("control-in-value", R + b"X: a\x01b\r\n\r\n", 400),
    ("del-in-value", R + b"X: a\x7fb\r\n\r\n", 400),
    ("bare-lf-line", R + b"Host: a\n\r\n", 400),
    ("bare-lf-request-line", b"GET http://a/ HTTP/1.1\n\n", 400),
    ("empty-field-name", R + b": x\r\n\r\n", 400),
    ("no-colon", R + b"X\r\n\r\n", 400),
    ("non-token-name", R + b"X\x80: a\r\n\r\n", 400),
    ("non-token-name-at", R + b"X@Y: a\r\n\r\n", 400),
    # --- request line, caught by llhttp ---
    ("unknown-method", b"FOO http://a/ HTTP/1.1\r\n\r\n", 400),
    ("lowercase-method", b"get http://a/ HTTP/1.1\r\n\r\n", 400),
    ("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    ("no-target", b"GET HTTP/1.1\r\n\r\n", 400),
    ("space-in-target", b"GET http://a b/ HTTP/1.1\r\n\r\n", 400),
    ("control-in-target", b"GET http://a/\x01 HTTP/1.1\r\n\r\n", 400),
    ("high-byte-in-target", b"GET http://a/\xff HTTP/1.1\r\n\r\n", 400),
    ("bad-version", b"GET http://a/ HTTP/1.2\r\n\r\n", 400),
    ("junk-version", b"GET http://a/ HTTQ/1.1\r\n\r\n", 400),
    ("space-after-version", b"GET http://a/ HTTP/1.1 \r\n\r\n", 400),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    # --- request target, ours ---
    ("origin-form", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("origin-form-path", b"GET /index.html?x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n\r\n", 400),
    ("https-absolute", b"GET https://a/ HTTP/1.1\r\n\r\n", 400),
    ("ftp-absolute", b"GET ftp://a/ HTTP/1.1\r\n\r\n", 400),
    ("userinfo", b"GET http://user:pw@a/ HTTP/1.1\r\n\r\n", 400),
    ("fragment", b"GET http://a/#frag HTTP/1.1\r\n\r\n", 400),
    ("empty-host", b"GET http:///x HTTP/1.1\r\n\r\n", 400),
    ("percent-host", b"GET http://a%20b/ HTTP/1.1\r\n\r\n", 400),
    ("port-zero", b"GET http://a:0/ HTTP/1.1\r\n\r\n", 400),
    ("port-too-big", b"GET http://a:65536/ HTTP/1.1\r\n\r\n", 400),
    ("port-alpha", b"GET http://a:http/ HTTP/1.1\r\n\r\n", 400),
    ("port-six-digits", b"GET http://a:000080/ HTTP/1.1\r\n\r\n", 400),
    ("ipv6-unbracketed", b"GET http://::1/ HTTP/1.1\r\n\r\n", 400),
    ("ipv6-bad", b"GET http://[::g]/ HTTP/1.1\r\n\r\n", 400),
    ("two-host-fields", R + b"Host: a\r\nHost: b\r\n\r\n", 400),
    ("connect-no-port", b"CONNECT a.example HTTP/1.1\r\n\r\n", 400),
    ("connect-empty-port", b"CONNECT a.example: HTTP/1.1\r\n\r\n", 400),
    ("connect-no-host", b"CONNECT :443 HTTP/1.1\r\n\r\n", 400),
    ("connect-path", b"CONNECT /x HTTP/1.1\r\n\r\n", 400),
    ("connect-absolute", b"CONNECT http://a:443/ HTTP/1.1\r\n\r\n", 400),
    ("connect-port-zero", b"CONNECT a:0 HTTP/1.1\r\n\r\n", 400),
    ("connect-port-too-big", b"CONNECT a:70000 HTTP/1.1\r\n\r\n", 400),
    ("connect-ipv6-unclosed", b"CONNECT [::1:443 HTTP/1.1\r\n\r\n", 400),
    ("connect-ipv6-no-port", b"CONNECT [::1] HTTP/1.1\r\n\r\n", 400),
    ("connect-ipv6-zone", b"CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\n\r\n", 400),
    ("connect-with-body", b"CONNECT a:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\n", 400),
    ("connect-chunked", b"CONNECT a:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    # --- versions, ours (llhttp parses them) ---
    ("http-2.0", b"GET http://a/ HTTP/2.0\r\n\r\n", 505),
    ("http-0.9", b"GET http://a/ HTTP/0.9\r\n\r\n", 505),
    # --- size limits, ours ---
    ("request-line-9k", b"GET http://a/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    ("request-line-9k-unterminated", b"GET http://a/" + b"a" * 9000, 414),
    ("field-line-9k", R + b"X: " + b"v" * 9000 + b"\r\n\r\n", 431),
    ("field-name-9k", R + b"X" * 9000 + b": v\r\n\r\n", 431),
    ("header-block-70k", R + fields(b"X-%d: " + b"v" * 1000 + b"\r\n", 70) + b"\r\n", 431),
    ("header-block-unterminated", R + b"X: " + b"v" * 8000 + b"\r\n" + b"Y: " * 30000, 431),
    ("101-headers", R + fields(b"X-%d: v\r\n", 101) + b"\r\n", 431),
    ("trailers-too-many", CHUNKED + b"0\r\n" + fields(b"T%d: v\r\n", 101) + b"\r\n", 431),
    ("trailers-too-large", CHUNKED + b"0\r\n" + b"T: " + b"v" * 70000, 431),
    ("trailer-line-9k", CHUNKED + b"0\r\n" + b"T: " + b"v" * 9000 + b"\r\n\r\n", 431),
]


@pytest.mark.parametrize(("data", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_in_one_feed(data: bytes, status: int) -> None:
    with pytest.raises(HttpProtocolError) as info:
        RequestParser().feed(data)
    assert info.value.status == status


@pytest.mark.parametrize(("data", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_when_streamed(data: bytes, status: int) -> None:
    parser = RequestParser()
    with pytest.raises(HttpProtocolError) as info:
        feed_chunks(parser, pieces(data, 3))
    assert info.value.status == status


def test_limits_are_not_off_by_one() -> None:
    line = b"GET http://a/" + b"a" * (8192 - len(b"GET http://a/ HTTP/1.1")) + b" HTTP/1.1\r\n"
    assert len(line) == 8192 + 2
    assert len(RequestParser().feed(line + b"\r\n")) == 2
    with pytest.raises(HttpProtocolError) as info:
        RequestParser().feed(line[:-2] + b"a\r\n\r\n")
    assert info.value.status == 414

    value = b"v" * (8192 - 1)
    assert len(RequestParser().feed(R + b"X: " + value + b"\r\n\r\n")) == 2
    assert len(RequestParser().feed(R + fields(b"X-%d: v\r\n", 100) + b"\r\n")) == 2


def test_a_byte_stream_that_never_ends_a_head_is_refused_early() -> None:
    parser = RequestParser()
    parser.feed(R)
    filler = [b"X-Filler: " + b"v" * 1000 + b"\r\n"] * 100
    with pytest.raises(HttpProtocolError) as info:
        feed_chunks(parser, filler)
    assert info.value.status == 431


def test_message_does_not_echo_field_values() -> None:
    with pytest.raises(HttpProtocolError) as info:
        RequestParser().feed(R + b"Proxy-Authorization: Basic c2VjcmV0\x00\r\n\r\n")
    assert b"c2VjcmV0".decode() not in str(info.value)
