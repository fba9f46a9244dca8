"""Heads of the usual strict shape skip llhttp: whatever a head is, both ways of reading it
give the same events or the same refusal."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocols import HttpProtocolError, RequestParser, ResponseParser
from gateway.protocols._http_parse import _Parser

REQUESTS = [
    b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET http://example.com:8080/a/b?c=d&e=%20f HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"HEAD http://127.0.0.1:81 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nX-Empty:\r\nX-Spaces:   padded  \r\nX-Tab:\tv\t\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nConnection: close\r\nProxy-Connection: keep-alive\r\n\r\n",
    b"POST http://x/up HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"PUT http://x/up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"OPTIONS http://x/ HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    # Outside the strict shape: llhttp judges these, with the same outcome as before.
    b"GET http://[::1]:8080/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://x/#frag HTTP/1.1\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nX-Latin: caf\xe9\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET http://x/ HTTP/1.1\nHost: x\n\n",
    b"BREW http://x/ HTTP/1.1\r\n\r\n",
    b"GET http://x/ HTTP/2.0\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nBad Name: v\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
    b"PUT http://x/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"PUT http://x/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"PUT http://x/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /origin-form HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET https://x/ HTTP/1.1\r\n\r\n",
    b"GET http://user@x/ HTTP/1.1\r\n\r\n",
    b"GET http://x:99999/ HTTP/1.1\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 Fine thanks\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\ny",
    b"HTTP/1.1 999 Odd\r\n\r\n",
    # Outside the strict shape.
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 caf\xe9\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
]


def _events(make: type[_Parser[Any]], data: bytes, *args: str) -> object:
    parser = make(*args)
    try:
        return parser.feed(data)
    except HttpProtocolError as exc:
        return ("refused", exc.status)


def _both(
    monkeypatch: pytest.MonkeyPatch, make: type[_Parser[Any]], data: bytes, *args: str
) -> None:
    fast = _events(make, data, *args)
    with monkeypatch.context() as patch:
        patch.setattr(_Parser, "_fast_head", lambda self, head: False)
        slow = _events(make, data, *args)
    assert fast == slow


@pytest.mark.parametrize("data", REQUESTS)
def test_a_request_head_reads_the_same_either_way(
    monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    _both(monkeypatch, RequestParser, data)


@pytest.mark.parametrize("data", RESPONSES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_response_head_reads_the_same_either_way(
    monkeypatch: pytest.MonkeyPatch, data: bytes, method: str
) -> None:
    _both(monkeypatch, ResponseParser, data, method)


def test_heads_of_the_strict_shape_skip_llhttp(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_llhttp(self: _Parser[Any]) -> None:
        raise AssertionError("llhttp used for a head of the strict shape")

    monkeypatch.setattr(RequestParser, "_new_llhttp", no_llhttp)
    monkeypatch.setattr(ResponseParser, "_new_llhttp", no_llhttp)
    assert len(RequestParser().feed(REQUESTS[0] + REQUESTS[1])) == 4
    assert len(ResponseParser("GET").feed(RESPONSES[0])) == 3
