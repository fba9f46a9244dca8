"""The listen-address grammar."""

from __future__ import annotations

import pytest

from config import ListenAddress, parse_listen_address


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:8899", "127.0.0.1", 8899, "127.0.0.1:8899"),
        ("localhost:8899", "127.0.0.1", 8899, "127.0.0.1:8899"),
        ("LocalHost:1", "127.0.0.1", 1, "127.0.0.1:1"),
        ("0.0.0.0:0", "0.0.0.0", 0, "0.0.0.0:0"),
        ("[::1]:8899", "::1", 8899, "[::1]:8899"),
        ("[2001:DB8:0::1]:65535", "2001:db8::1", 65535, "[2001:db8::1]:65535"),
    ],
)
def test_valid(text: str, host: str, port: int, shown: str) -> None:
    address = parse_listen_address(text)
    assert address == ListenAddress(host, port)
    assert str(address) == shown


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1", "expected host:port"),
        ("127.0.0.1:", "the port must be 0-65535"),
        ("127.0.0.1:65536", "the port must be 0-65535"),
        ("127.0.0.1:-1", "the port must be 0-65535"),
        ("127.0.0.1:+80", "the port must be 0-65535"),
        ("127.0.0.1:\u0668\u0668", "the port must be 0-65535"),
        ("proxy.example:80", "the host must be an IP address or localhost"),
        (":8899", "the host must be an IP address or localhost"),
        ("::1:8899", "write an IPv6 address in brackets"),
        ("[::1]8899", "expected [IPv6]:port"),
        ("[::1:8899", "missing ']'"),
        ("[127.0.0.1]:80", "is not an IPv6 address"),
        ("[fe80::1%eth0]:80", "zone ids are not supported"),
        ("", "expected host:port"),
    ],
)
def test_invalid(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="invalid listen address") as caught:
        parse_listen_address(text)
    assert reason in str(caught.value)


def test_loopback() -> None:
    assert parse_listen_address("127.9.9.9:1").is_loopback
    assert parse_listen_address("[::1]:1").is_loopback
    assert parse_listen_address("[::ffff:127.0.0.1]:1").is_loopback
    assert not parse_listen_address("0.0.0.0:1").is_loopback
    assert not parse_listen_address("[::]:1").is_loopback
    assert not parse_listen_address("10.0.0.1:1").is_loopback
