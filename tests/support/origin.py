"""A test origin (HTTP/1.1 over aiohttp, plain or TLS) and a raw TCP echo server.

`Origin` routes:

- `* /echo` (GET, POST, PUT, DELETE, PATCH, HEAD, ...): JSON with the connection's peer address,
  method, raw path with query, headers as received (in order) and the body's sha256 and length.
- `GET /bytes/<n>`: `n` bytes of `pattern(n)` with `Content-Length` and `X-Body-Sha256`;
  `?chunked=1` streams them chunked instead (no Content-Length).
- `POST|PUT /upload`: streams the request body (Content-Length or chunked), answers JSON
  `{"sha256", "length"}`.
- `GET /status/<code>`: that status with a short text body.
- `GET /slow?seconds=S`: answers after S seconds (cancelled when the client goes away).

Each request is counted per path (`origin.count("/upload", "POST") == 1`: never replayed) and
recorded in `origin.requests` before its body is read.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import shutil
import ssl
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from aiohttp import web

from tests.support.net import TcpServer

#: Size of one pattern block; each block starts with its index so swapped blocks are caught.
PATTERN_BLOCK = 65536
_NOISE = random.Random(0x5EED).randbytes(PATTERN_BLOCK)


def iter_pattern(length: int) -> Iterator[bytes]:
    """The deterministic body of `GET /bytes/<length>`, in blocks of at most `PATTERN_BLOCK`."""
    index = 0
    while length > 0:
        block = (index.to_bytes(8, "big") + _NOISE[8:])[:length]
        yield block
        length -= len(block)
        index += 1


def pattern(length: int) -> bytes:
    """The `length` bytes `GET /bytes/<length>` sends (a prefix of every longer pattern)."""
    return b"".join(iter_pattern(length))


@functools.lru_cache(maxsize=64)
def pattern_sha256(length: int) -> str:
    """Hex sha256 of `pattern(length)`."""
    digest = hashlib.sha256()
    for block in iter_pattern(length):
        digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class OriginRequest:
    """One request as the origin received it."""

    method: str
    path: str  # raw path with query string
    peer: str  # the ip the connection came from
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Origin:
    """The test origin on `host` (port 0 unless given); HTTPS when given an `ssl_context`."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        #: Requests per path (without query), counted when the request head arrives.
        self.hits: Counter[tuple[str, str]] = Counter()
        self.requests: list[OriginRequest] = []
        #: (address, port) of every client connection that sent a request.
        self.connections: set[tuple[str, int]] = set()
        self._runner: web.AppRunner | None = None

    # -- addresses --------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def url(self) -> str:
        """Base URL, e.g. "http://127.0.0.1:41234"."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def url_for(self, path: str) -> str:
        """Absolute URL of `path` ("/echo?x=1") on this origin."""
        return self.url + path

    # -- bookkeeping ------------------------------------------------------------------------

    def count(self, path: str, method: str | None = None) -> int:
        """How many requests for `path` (no query) arrived, optionally only with `method`."""
        if method is not None:
            return self.hits[(method.upper(), path)]
        return sum(n for (_, seen_path), n in self.hits.items() if seen_path == path)

    def requests_for(self, path: str) -> list[OriginRequest]:
        return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> Self:
        app = web.Application(middlewares=[self._record])
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_get("/bytes/{n:\\d+}", self._bytes)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_get("/status/{code:\\d{3}}", self._status)
        app.router.add_get("/slow", self._slow)
        # Handlers end when their client goes away; shutdown does not wait long for stragglers.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.25
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- routes -----------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[(request.method, request.path)] += 1
        if request.transport is not None:
            peername = request.transport.get_extra_info("peername")
            self.connections.add((peername[0], peername[1]))
        self.requests.append(
            OriginRequest(
                method=request.method,
                path=request.raw_path,
                peer=request.remote or "",
                headers=_raw_headers(request),
            )
        )
        return await handler(request)

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        digest, length = await _hash_body(request)
        headers = _raw_headers(request)
        body = {
            "peer": request.remote,
            "method": request.method,
            "path": request.raw_path,
            "headers": [list(pair) for pair in headers],
            "body_sha256": digest,
            "body_length": length,
        }
        return web.json_response(body)

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        length = int(request.match_info["n"])
        response = web.StreamResponse(headers={"X-Body-Sha256": pattern_sha256(length)})
        response.content_type = "application/octet-stream"
        if request.query.get("chunked") in ("1", "true", "yes"):
            response.enable_chunked_encoding()
        else:
            response.content_length = length
        await response.prepare(request)
        if request.method != "HEAD":
            for block in iter_pattern(length):
                await response.write(block)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        digest, length = await _hash_body(request)
        return web.json_response({"sha256": digest, "length": length})

    async def _status(self, request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        if code < 200:
            raise web.HTTPBadRequest(text="final statuses only (200-599)\n")
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}\n")

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        seconds = float(request.query.get("seconds", "1"))
        await asyncio.sleep(seconds)
        return web.Response(text=f"slept {seconds}\n")


def _raw_headers(request: web.Request) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]


async def _hash_body(request: web.Request) -> tuple[str, int]:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return digest.hexdigest(), length


# -- TLS ------------------------------------------------------------------------------------


@dataclass
class TlsMaterial:
    """A CA and a server certificate for 127.0.0.1, ::1 and localhost, as PEM files."""

    ca_path: Path
    cert_path: Path  # server certificate chain
    key_path: Path
    generator: str  # "trustme" or "openssl"
    _server: ssl.SSLContext | None = field(default=None, repr=False)

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the certificate (made once, then shared)."""
        if self._server is None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.cert_path, self.key_path)
            self._server = context
        return self._server

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts the CA (and verifies host names)."""
        return ssl.create_default_context(cafile=str(self.ca_path))


def make_tls_material(directory: Path, *, use_trustme: bool | None = None) -> TlsMaterial:
    """Write a CA and a server certificate into `directory`.

    Uses `trustme` when importable (or when `use_trustme` is True), else the `openssl` command
    (one self-signed CA certificate that is also the server's). Raises RuntimeError when neither
    is available.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if use_trustme is None or use_trustme:
        try:
            import trustme
        except ImportError:
            if use_trustme:
                raise
        else:
            ca = trustme.CA(organization_name="proxygate tests")
            leaf = ca.issue_cert("127.0.0.1", "::1", "localhost")
            material = TlsMaterial(
                directory / "ca.pem", directory / "cert.pem", directory / "key.pem", "trustme"
            )
            ca.cert_pem.write_to_path(str(material.ca_path))
            leaf.private_key_pem.write_to_path(str(material.key_path))
            leaf.cert_chain_pems[0].write_to_path(str(material.cert_path))
            for pem in leaf.cert_chain_pems[1:]:
                pem.write_to_path(str(material.cert_path), append=True)
            return material
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("neither trustme nor the openssl command is available for test TLS")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    command += ["-nodes", "-days", "2", "-subj", "/CN=proxygate test origin"]
    command += ["-keyout", str(key), "-out", str(cert)]
    command += ["-addext", "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost"]
    command += ["-addext", "basicConstraints=critical,CA:TRUE"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    return TlsMaterial(cert, cert, key, "openssl")


# -- raw TCP echo -------------------------------------------------------------------------------


class EchoServer(TcpServer):
    """Echoes bytes back; on the client's EOF writes `b"EOF after N bytes\\n"` and closes.

    `accepted` holds the peer (host, port) of every connection, so tests see which address a
    tunnel came from.
    """

    @property
    def peers(self) -> list[str]:
        """Peer ip of every connection, in order."""
        return [host for host, _ in self.accepted]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(65536):
            total += len(data)
            writer.write(data)
            await writer.drain()
        writer.write(b"EOF after %d bytes\n" % total)
        await writer.drain()


def trailer(total: int) -> bytes:
    """The line `EchoServer` writes after echoing `total` bytes and seeing EOF."""
    return b"EOF after %d bytes\n" % total
