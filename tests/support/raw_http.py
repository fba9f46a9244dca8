"""A raw HTTP/1.1 client for tests: a connection to a proxy, requests written byte for byte,
responses read as they come (chunked or not), and what the echo origin answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tests.support.origin import EchoServer, Origin

__all__ = [
    "TIMEOUT",
    "RawResponse",
    "authority",
    "closed_by_peer",
    "echo_of",
    "raw_connection",
    "read_chunked",
    "read_head",
    "read_response",
    "request",
    "stays_open",
]

Address = tuple[str, int]
#: Seconds any one read waits.
TIMEOUT = 5.0


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    #: How the body was delimited: "length", "chunked", "close" or "none".
    framing: str

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def has(self, name: str) -> bool:
        return self.header(name) is not None


@contextlib.asynccontextmanager
async def raw_connection(
    address: Address,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection, closed (and waited for) on the way out."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> tuple[str, int, str, list[tuple[str, str]]]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    lines = raw.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), f"not a status line: {lines[0]!r}"
    version, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return version, int(status), reason, headers


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET") -> RawResponse:
    """One response (an interim 1xx one comes back on its own, without a body)."""
    version, status, reason, headers = await read_head(reader)
    response = RawResponse(version, status, reason, headers, b"", "none")
    if status < 200 or status in (204, 304) or method == "HEAD":
        return response
    length = response.header("Content-Length")
    if (response.header("Transfer-Encoding") or "").lower() == "chunked":
        response.body = await asyncio.wait_for(read_chunked(reader), TIMEOUT)
        response.framing = "chunked"
    elif length is not None:
        response.body = await asyncio.wait_for(reader.readexactly(int(length)), TIMEOUT)
        response.framing = "length"
    else:
        response.body = await asyncio.wait_for(reader.read(), TIMEOUT)
        response.framing = "close"
    return response


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the peer ends the connection (EOF or reset) with nothing more to read."""
    try:
        return await asyncio.wait_for(reader.read(1), TIMEOUT) == b""
    except ConnectionError:
        return True


async def stays_open(reader: asyncio.StreamReader, seconds: float = 0.2) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    return False


def request(
    method: str,
    target: str,
    *,
    version: str = "1.1",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def authority(server: Origin | EchoServer) -> str:
    host, port = server.address if isinstance(server, EchoServer) else (server.host, server.port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def echo_of(response: RawResponse) -> dict[str, object]:
    assert response.status == 200, response
    result: dict[str, object] = json.loads(response.body)
    return result
