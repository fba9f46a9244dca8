"""Socks4Server: SOCKS4 and SOCKS4a requests, refusals, streaming and early data."""

from __future__ import annotations

import pytest

from gateway.protocols import Socks4Connect, Socks4Server, SocksProtocolError
from tests.protocols.helpers import feed_chunks, pieces

REJECTED = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
GRANTED = b"\x00\x5a\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("request_bytes", "event"),
    [
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", Socks4Connect("127.0.0.1", 80, "", False)),
        (
            b"\x04\x01\x01\xbb\x5d\xb8\xd8\x22alice\x00",
            Socks4Connect("93.184.216.34", 443, "alice", False),
        ),
        (
            b"\x04\x01\x01\xbb\x00\x00\x00\x01bob\x00example.com\x00",
            Socks4Connect("example.com", 443, "bob", True),
        ),
        (
            b"\x04\x01\x00\x16\x00\x00\x00\xff\x00host\x00",
            Socks4Connect("host", 22, "", True),
        ),
        (b"\x04\x01\x00\x50\x00\x00\x00\x00\x00", Socks4Connect("0.0.0.0", 80, "", False)),
        (
            b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 255 + b"\x00",
            Socks4Connect("1.2.3.4", 80, "u" * 255, False),
        ),
        (
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"d" * 255 + b"\x00",
            Socks4Connect("d" * 255, 80, "", True),
        ),
        (
            b"\x04\x01\x00\x50\x01\x02\x03\x04" + "j\u00f6rg".encode() + b"\x00",
            Socks4Connect("1.2.3.4", 80, "j\u00f6rg", False),
        ),
    ],
)
def test_requests(request_bytes: bytes, event: Socks4Connect) -> None:
    server = Socks4Server()
    assert server.feed(request_bytes) == [event]
    assert server.reply(True) == GRANTED
    assert server.reply(False) == REJECTED


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00",  # BIND
        b"\x04\x03",  # unknown command
        b"\x05\x01\x00\x50\x7f\x00\x00\x01\x00",  # not SOCKS4
        b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 256,  # user id too long
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"d" * 256,  # domain too long
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00",  # empty domain
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a b\x00",  # space in domain
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00caf\xc3\xa9\x00",  # non-ASCII domain
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\xff\xfe\x00",  # user id not UTF-8
    ],
)
def test_refusals(request_bytes: bytes) -> None:
    server = Socks4Server()
    with pytest.raises(SocksProtocolError) as info:
        server.feed(request_bytes)
    assert (info.value.reply_code, info.value.reply) == (0x5B, REJECTED)
    with pytest.raises(SocksProtocolError):
        server.feed(b"")


def test_byte_by_byte_4a_with_early_data() -> None:
    stream = b"\x04\x01\x01\xbb\x00\x00\x00\x07user\x00example.net\x00\x16\x03\x01hello"
    server = Socks4Server()
    assert feed_chunks(server, pieces(stream, 1)) == [
        Socks4Connect("example.net", 443, "user", True)
    ]
    assert server.take_buffered() == b"\x16\x03\x01hello"


def test_pipelined_bytes_are_preserved_and_capped() -> None:
    server = Socks4Server()
    events = server.feed(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00GET / HTTP/1.1\r\n")
    assert events == [Socks4Connect("127.0.0.1", 80, "", False)]
    assert server.feed(b"more") == []
    assert server.take_buffered() == b"GET / HTTP/1.1\r\nmore"
    server.feed(b"x" * 65536)
    with pytest.raises(SocksProtocolError):
        server.feed(b"x")


def test_reply_needs_a_request() -> None:
    with pytest.raises(RuntimeError):
        Socks4Server().reply(True)
