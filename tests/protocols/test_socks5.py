"""Socks5Server: greeting, RFC 1929 auth, requests, replies, streaming and early data."""

from __future__ import annotations

import pytest

from gateway.protocols import (
    AddressType,
    Socks5Auth,
    Socks5Connect,
    Socks5MethodSelected,
    Socks5Reply,
    Socks5Server,
    SocksProtocolError,
)
from tests.protocols.helpers import feed_chunks, pieces

NO_AUTH = b"\x05\x01\x00"
USER_PASS = b"\x05\x01\x02"
CONNECT_V4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x01\xbb"


def auth_message(username: bytes, password: bytes) -> bytes:
    return bytes((1, len(username))) + username + bytes((len(password),)) + password


@pytest.mark.parametrize(
    ("auth_required", "greeting", "method"),
    [
        (False, b"\x05\x01\x00", 0x00),
        # Credentials offered are taken even when not required: the username routes.
        (False, b"\x05\x02\x00\x02", 0x02),
        (False, b"\x05\x02\x02\x00", 0x02),
        (False, b"\x05\x01\x02", 0x02),  # only user/pass offered: accepted, credentials passed up
        (True, b"\x05\x02\x00\x02", 0x02),
        (True, b"\x05\x03\x01\x02\x80", 0x02),
    ],
)
def test_greeting_method_choice(auth_required: bool, greeting: bytes, method: int) -> None:
    server = Socks5Server(auth_required=auth_required)
    assert server.feed(greeting) == [Socks5MethodSelected(method, bytes((5, method)))]


@pytest.mark.parametrize(
    ("auth_required", "greeting"),
    [
        (True, b"\x05\x01\x00"),
        (False, b"\x05\x01\x01"),  # GSSAPI only
        (False, b"\x05\x00"),  # no methods at all
        (False, b"\x04\x01\x00"),  # wrong version
    ],
)
def test_greeting_without_acceptable_method(auth_required: bool, greeting: bytes) -> None:
    server = Socks5Server(auth_required=auth_required)
    with pytest.raises(SocksProtocolError) as info:
        server.feed(greeting)
    assert (info.value.reply_code, info.value.reply) == (0xFF, b"\x05\xff")
    with pytest.raises(SocksProtocolError):
        server.feed(b"\x05\x01\x00")  # errors are sticky


def test_auth_success_then_connect() -> None:
    server = Socks5Server(auth_required=True)
    assert server.feed(USER_PASS) == [Socks5MethodSelected(2, b"\x05\x02")]
    events = server.feed(auth_message(b"user-pool-dc", b"s3cret"))
    assert events == [Socks5Auth("user-pool-dc", "s3cret")]
    assert "s3cret" not in repr(events[0])
    with pytest.raises(RuntimeError):
        server.reply(0)  # no request yet
    assert server.auth_reply(True) == b"\x01\x00"
    assert server.feed(CONNECT_V4) == [Socks5Connect("127.0.0.1", 443, AddressType.IPV4)]
    assert server.reply(Socks5Reply.SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def test_auth_failure_closes() -> None:
    server = Socks5Server(auth_required=True)
    server.feed(USER_PASS)
    server.feed(auth_message(b"u", b"wrong"))
    assert server.auth_reply(False) == b"\x01\x01"
    with pytest.raises(SocksProtocolError):
        server.feed(CONNECT_V4)
    with pytest.raises(RuntimeError):
        server.auth_reply(True)


def test_success_reply_requires_accepted_credentials() -> None:
    server = Socks5Server(auth_required=False)
    # Pipelined: the request is parsed before the driver decided on the credentials.
    events = server.feed(USER_PASS + auth_message(b"u", b"p") + CONNECT_V4)
    assert [type(e) for e in events] == [Socks5MethodSelected, Socks5Auth, Socks5Connect]
    with pytest.raises(RuntimeError):
        server.reply(0)
    assert server.reply(Socks5Reply.NOT_ALLOWED)[:2] == b"\x05\x02"
    server.auth_reply(True)
    assert server.reply(0)[:2] == b"\x05\x00"


@pytest.mark.parametrize(
    ("message", "reply_code"),
    [
        (b"\x02\x01u\x01p", 0x01),  # sub-negotiation version must be 1
        (auth_message(b"\xff\xfe", b"p"), 0x01),  # not UTF-8
    ],
)
def test_bad_credentials_message(message: bytes, reply_code: int) -> None:
    server = Socks5Server(auth_required=True)
    server.feed(USER_PASS)
    with pytest.raises(SocksProtocolError) as info:
        server.feed(message)
    assert (info.value.reply_code, info.value.reply) == (reply_code, b"\x01\x01")


def test_empty_username_and_password_are_passed_up() -> None:
    server = Socks5Server(auth_required=True)
    server.feed(USER_PASS)
    assert server.feed(b"\x01\x00\x00") == [Socks5Auth("", "")]


@pytest.mark.parametrize(
    ("request_bytes", "event"),
    [
        (CONNECT_V4, Socks5Connect("127.0.0.1", 443, AddressType.IPV4)),
        (
            b"\x05\x01\x00\x04" + bytes.fromhex("20010db8000000000000000000000001") + b"\x00\x50",
            Socks5Connect("2001:db8::1", 80, AddressType.IPV6),
        ),
        (
            b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\xff\xff",
            Socks5Connect("::1", 65535, AddressType.IPV6),
        ),
        (
            b"\x05\x01\x00\x03\x0bexample.com\x1f\x90",
            Socks5Connect("example.com", 8080, AddressType.DOMAIN),
        ),
        (
            b"\x05\x01\x00\x03\xff" + b"a" * 255 + b"\x00\x16",
            Socks5Connect("a" * 255, 22, AddressType.DOMAIN),
        ),
        (
            b"\x05\x01\x00\x03\x07Ex-A.Co\x00\x00",
            Socks5Connect("Ex-A.Co", 0, AddressType.DOMAIN),
        ),
    ],
)
def test_connect_requests(request_bytes: bytes, event: Socks5Connect) -> None:
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH)
    assert server.feed(request_bytes) == [event]
    assert server.take_buffered() == b""


def error_reply(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", 0x07),  # BIND
        (b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00", 0x07),  # UDP ASSOCIATE
        (b"\x05\x09", 0x07),  # unknown command, refused before the rest arrives
        (b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50", 0x08),  # unknown ATYP
        (b"\x05\x01\x00\x00", 0x08),
        (b"\x05\x01\x00\xff", 0x08),
        (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", 0x01),  # bad VER
        (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", 0x01),  # RSV not zero
        (b"\x05\x01\x00\x03\x00\x00\x50", 0x01),  # empty domain
        (b"\x05\x01\x00\x03\x05a\x00b.c\x00\x50", 0x01),  # NUL in domain
        (b"\x05\x01\x00\x03\x05a b.c\x00\x50", 0x01),  # space in domain
        (b"\x05\x01\x00\x03\x05caf\xc3\xa9\x00\x50", 0x01),  # non-ASCII domain
        (b"\x05\x01\x00\x03\x03a\nb\x00\x50", 0x01),  # control character
    ],
)
def test_request_errors(request_bytes: bytes, code: int) -> None:
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH)
    with pytest.raises(SocksProtocolError) as info:
        server.feed(request_bytes)
    assert info.value.reply_code == code
    assert info.value.reply == error_reply(code)


def test_byte_by_byte_with_auth_and_early_data() -> None:
    stream = (
        b"\x05\x02\x00\x02"
        + auth_message(b"alice", b"pw")
        + b"\x05\x01\x00\x03\x0bexample.org\x01\xbb"
        + b"\x16\x03\x01early"
    )
    server = Socks5Server(auth_required=True)
    events = feed_chunks(server, pieces(stream, 1))
    assert events == [
        Socks5MethodSelected(2, b"\x05\x02"),
        Socks5Auth("alice", "pw"),
        Socks5Connect("example.org", 443, AddressType.DOMAIN),
    ]
    assert server.take_buffered() == b"\x16\x03\x01early"


def test_pipelined_tunnel_bytes_are_preserved() -> None:
    server = Socks5Server(auth_required=False)
    events = server.feed(NO_AUTH + CONNECT_V4 + b"GET / HTTP/1.1\r\n\r\n")
    assert len(events) == 2
    server.feed(b"more")
    assert server.reply(0) == error_reply(0)
    assert server.take_buffered() == b"GET / HTTP/1.1\r\n\r\nmore"
    assert server.take_buffered() == b""


def test_early_data_is_capped() -> None:
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH + CONNECT_V4)
    server.feed(b"x" * 65536)
    with pytest.raises(SocksProtocolError) as info:
        server.feed(b"x")
    assert info.value.reply_code == 0x01


@pytest.mark.parametrize(
    ("code", "host", "port", "expected"),
    [
        (0, "0.0.0.0", 0, b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
        (5, "0.0.0.0", 0, b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"),
        (0, "10.1.2.3", 8080, b"\x05\x00\x00\x01\x0a\x01\x02\x03\x1f\x90"),
        (0, "::1", 1, b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x01"),
        (4, "gw.example", 443, b"\x05\x04\x00\x03\x0agw.example\x01\xbb"),
    ],
)
def test_replies(code: int, host: str, port: int, expected: bytes) -> None:
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH + CONNECT_V4)
    assert server.reply(code, host, port) == expected


def test_reply_code_must_be_a_byte() -> None:
    server = Socks5Server(auth_required=False)
    server.feed(NO_AUTH + CONNECT_V4)
    with pytest.raises(ValueError, match="byte"):
        server.reply(-1)
