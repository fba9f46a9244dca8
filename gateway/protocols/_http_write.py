"""HTTP/1.1 serialization: heads, chunks and the gateway's own error responses."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

__all__ = [
    "LAST_CHUNK",
    "REASON_PHRASES",
    "encode_chunk",
    "error_response",
    "serialize_request_head",
    "serialize_response_head",
]

#: Terminates a chunked body (no trailers).
LAST_CHUNK = b"0\r\n\r\n"

#: Standard reason phrases by status code, as RFC 9110 words them (older Pythons' HTTPStatus
#: still carries some RFC 7231 phrases).
REASON_PHRASES: dict[int, str] = {
    **{s.value: s.phrase for s in HTTPStatus},
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}


def _finish_head(parts: list[bytes]) -> bytes:
    parts.append(b"\r\n")
    head = b"".join(parts)
    # One line per part group: any extra CR or LF means a value tried to smuggle a line in. Two
    # C-level counts over a head of a kilobyte or so are cheaper than checking each value.
    lines = (len(parts) - 2) // 4 + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("CR or LF inside a start line or header field")
    return head


def serialize_request_head(
    method: str, target: str, headers: Iterable[tuple[bytes, bytes]]
) -> bytes:
    """`METHOD target HTTP/1.1`, the fields in order, and the blank line.

    Raises ValueError if a part would break the message framing (CR, LF, or a space in the
    method or target) or is not Latin-1.
    """
    if " " in method or " " in target:
        raise ValueError("space inside the method or request target")
    parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    return _finish_head(parts)


def serialize_response_head(
    status: int,
    reason: str,
    headers: Iterable[tuple[bytes, bytes]],
    http_version: str = "1.1",
) -> bytes:
    """`HTTP/x.y status reason`, the fields in order, and the blank line."""
    if not 100 <= status <= 999:
        raise ValueError("status code must have three digits")
    parts = [f"HTTP/{http_version} {status} {reason}\r\n".encode("latin-1")]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    return _finish_head(parts)


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. Empty data gives b"" since an empty chunk would end the body."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(
    status: int,
    *,
    proxy_status: str | None = None,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
    body: str | None = None,
) -> bytes:
    """A complete `Connection: close` response with a short text/plain body.

    `proxy_status` becomes an RFC 9209 `Proxy-Status` field, e.g.
    `proxygate; error=connection_refused`. `body` defaults to "<status> <reason>\\n".
    """
    reason = REASON_PHRASES.get(status, "Unknown")
    payload = (f"{status} {reason}\n" if body is None else body).encode()
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(payload)),
        (b"Connection", b"close"),
    ]
    if proxy_status is not None:
        headers.append((b"Proxy-Status", proxy_status.encode("ascii")))
    headers.extend(extra_headers)
    return serialize_response_head(status, reason, headers) + payload
