"""What clients of every protocol get from a gateway whose storage is away, and waiting for it to
serve again: shared by the outage tests on a switched-off storage and on a stopped PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from tests.support.origin import EchoServer, Origin
from tests.support.proxying import fetch

__all__ = [
    "STORAGE_DOWN",
    "Answers",
    "answers",
    "echoes",
    "open_tunnel",
    "serves_again",
]

#: The Proxy-Status of a request refused because the storage is away.
STORAGE_DOWN = 'proxygate; error=proxy_internal_error; details="storage unavailable"'
#: No answer may take longer than this (the gateway must never hang on a storage away).
ANSWER_WITHIN = 15.0


@dataclass(frozen=True)
class Answers:
    http: tuple[int, str | None]
    connect: tuple[int, str | None]
    socks5: int
    socks4: int


async def answers(proxy: tuple[str, int], origin: Origin, echo: EchoServer) -> Answers:
    """Status and Proxy-Status of a plain request and a CONNECT, and the SOCKS5 and SOCKS4
    reply codes (0 for success), each bounded in time."""
    host, port = proxy
    async with asyncio.timeout(ANSWER_WITHIN):
        status, headers, _ = await fetch(origin.url_for("/echo"), f"http://{host}:{port}")
        http = (status, headers.get("Proxy-Status"))
        connect = await _connect_answer(proxy, echo)
        socks5 = await _socks_reply(f"socks5://{host}:{port}", echo)
        socks4 = await _socks_reply(f"socks4://{host}:{port}", echo)
    return Answers(http, connect, socks5, socks4)


async def serves_again(proxy: tuple[str, int], origin: Origin, within: float) -> int:
    """Plain requests until one succeeds (AssertionError after `within` seconds); how many
    were refused before it."""
    refused = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        async with asyncio.timeout(ANSWER_WITHIN):
            status, _, _ = await fetch(origin.url_for("/echo"), f"http://{proxy[0]}:{proxy[1]}")
        if status == 200:
            return refused
        assert status == 503, status
        refused += 1
        if loop.time() > deadline:
            raise AssertionError(f"still 503 after {within:g}s")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def open_tunnel(
    proxy: tuple[str, int], echo: EchoServer
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A CONNECT tunnel to the echo server, established (200) and closed on the way out."""
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        target = f"{echo.host}:{echo.port}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_WITHIN)
        assert head.startswith(b"HTTP/1.1 200"), head
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"ping")
    return await asyncio.wait_for(reader.readexactly(4), ANSWER_WITHIN) == b"ping"


async def _connect_answer(proxy: tuple[str, int], echo: EchoServer) -> tuple[int, str | None]:
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        target = f"{echo.host}:{echo.port}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    fields = dict(line.split(": ", 1) for line in head[1:] if line)
    return int(head[0].split(" ")[1]), fields.get("Proxy-Status")


async def _socks_reply(url: str, echo: EchoServer) -> int:
    try:
        stream = await Proxy.from_url(url).connect(echo.host, echo.port, timeout=ANSWER_WITHIN)
    except ProxyError as exc:
        return int(exc.error_code or -1)
    stream.close()
    return 0
