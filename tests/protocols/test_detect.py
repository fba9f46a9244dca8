from __future__ import annotations

import pytest

from gateway.protocols import Protocol, detect_protocol


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (0x05, Protocol.SOCKS5),
        (0x04, Protocol.SOCKS4),
        (ord("G"), Protocol.HTTP),
        (ord("C"), Protocol.HTTP),
        (0x16, Protocol.HTTP),  # TLS: the HTTP parser refuses it with a clear 400
        (0x00, Protocol.HTTP),
        (0xFF, Protocol.HTTP),
    ],
)
def test_detect_protocol(first: int, expected: Protocol) -> None:
    assert detect_protocol(first) is expected
