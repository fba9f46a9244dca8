"""The origin the load goes to: the harness's own asyncio server, or nginx when installed.

Routes (both origins):

- `GET /bytes/N`: N bytes (not compressible), with Content-Length; keep-alive unless asked
  to close.
- `GET /who`: the client's address as the body: the load generator reads which upstream
  (each leaves from its own 127.0.0.x address) carried a request.

Plain HTTP and TLS on two ports of the same host. The TLS certificate is made at start by the
`openssl` command (a throwaway EC key, valid for the origin's address); without `openssl` there
is no TLS port.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from loadtest import procs

__all__ = ["BuiltinOrigin", "NginxOrigin", "OriginAddress", "make_certificate"]

#: Bodies are slices of this block; larger bodies repeat it.
_BLOCK = os.urandom(256 * 1024)
_BLOCK_VIEW = memoryview(_BLOCK)
#: Largest body served in one write, with its head (a cached response).
_SMALL = 64 * 1024
#: Longest request head accepted.
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class OriginAddress:
    host: str
    port: int
    tls_port: int | None
    cafile: str | None
    kind: str  # "builtin" or "nginx"


def make_certificate(directory: Path, host: str) -> tuple[Path, Path] | None:
    """A self-signed certificate and key for `host`, or None without `openssl`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "origin-cert.pem", directory / "origin-key.pem"
    command = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={host}",
        "-addext", f"subjectAltName=IP:{host},DNS:localhost",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, timeout=30, check=False)
    return (cert, key) if done.returncode == 0 else None


class _OriginProtocol(asyncio.Protocol):
    """One client connection: request heads in, cached small responses or streamed bodies out."""

    __slots__ = ("_buf", "_close_after", "_left", "_paused", "_queue", "_transport")

    _cache: dict[tuple[int, bool], bytes] = {}
    #: Open connections, so that stopping can end them (Server.close leaves them open).
    live: set[asyncio.Transport] = set()

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._left = 0  # body bytes still to stream
        self._paused = False
        self._close_after = False
        self._queue: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)
        self.live.add(self._transport)
        self._transport.set_write_buffer_limits(high=1 << 20)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self.live.discard(self._transport)
        self._transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(buf[:end])
            del buf[: end + 4]
            if self._left or self._queue:
                self._queue.append(head)  # pipelined behind a body still streaming
            else:
                self._serve(head)
        if len(buf) > _MAX_HEAD and self._transport is not None:
            self._transport.close()

    def _serve(self, head: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        line_end = head.find(b"\r\n")
        parts = (head if line_end < 0 else head[:line_end]).split(b" ")
        target = parts[1] if len(parts) == 3 else b""
        lowered = head.lower()
        close = b"connection: close" in lowered or (
            parts[-1] == b"HTTP/1.0" and b"connection: keep-alive" not in lowered
        )
        if target.startswith(b"/bytes/") and target[7:].isdigit():
            self._send_bytes(transport, int(target[7:]), close)
        elif target == b"/who":
            peer = transport.get_extra_info("peername")
            body = str(peer[0] if peer else "").encode()
            transport.write(_head(200, len(body), close) + body)
            self._finish(transport, close)
        else:
            body = b"not found\n"
            transport.write(_head(404, len(body), close) + body)
            self._finish(transport, close)

    def _send_bytes(self, transport: asyncio.Transport, size: int, close: bool) -> None:
        if size <= _SMALL:
            key = (size, close)
            response = self._cache.get(key)
            if response is None:
                response = self._cache[key] = _head(200, size, close) + _BLOCK[:size]
            transport.write(response)
            self._finish(transport, close)
            return
        transport.write(_head(200, size, close))
        self._left = size
        self._close_after = close
        self._pump()

    def _pump(self) -> None:
        transport = self._transport
        while self._left and not self._paused and transport is not None:
            chunk = min(self._left, len(_BLOCK))
            transport.write(_BLOCK_VIEW[:chunk])
            self._left -= chunk
        if not self._left and transport is not None and not transport.is_closing():
            self._finish(transport, self._close_after)

    def _finish(self, transport: asyncio.Transport, close: bool) -> None:
        if close:
            transport.close()
            return
        while self._queue and not self._left and not transport.is_closing():
            self._serve(self._queue.pop(0))


def _head(status: int, length: int, close: bool) -> bytes:
    reason = b"OK" if status == 200 else b"Not Found"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Content-Type: application/octet-stream\r\n",
            b"Content-Length: %d\r\n" % length,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
        )
    )


class BuiltinOrigin:
    """The harness's own origin, in the rig's event loop."""

    def __init__(self, host: str, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir
        self._servers: list[asyncio.Server] = []
        self.address: OriginAddress | None = None

    async def start(self) -> OriginAddress:
        loop = asyncio.get_running_loop()
        plain = await loop.create_server(_OriginProtocol, self.host, 0, backlog=4096)
        self._servers.append(plain)
        tls_port, cafile = None, None
        pair = make_certificate(self.workdir, self.host)
        if pair is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*pair)
            secure = await loop.create_server(
                _OriginProtocol, self.host, 0, ssl=context, backlog=4096
            )
            self._servers.append(secure)
            tls_port, cafile = secure.sockets[0].getsockname()[1], str(pair[0])
        port = plain.sockets[0].getsockname()[1]
        self.address = OriginAddress(self.host, port, tls_port, cafile, "builtin")
        return self.address

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for transport in list(_OriginProtocol.live):
            transport.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


class NginxOrigin:
    """nginx (one worker) serving the same routes from files made for the sizes asked."""

    def __init__(self, host: str, workdir: Path, sizes: list[int]) -> None:
        self.host = host
        self.workdir = workdir / "nginx"
        self.sizes = sizes
        self.process: subprocess.Popen[bytes] | None = None
        self.address: OriginAddress | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None

    async def start(self) -> OriginAddress:
        program = shutil.which("nginx")
        if program is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
        root = self.workdir / "www" / "bytes"
        root.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        for size in self.sizes:
            with (root / str(size)).open("wb") as body:  # sparse: costs no disk
                body.truncate(size)
        port = procs.free_port(self.host)
        pair = make_certificate(self.workdir, self.host)
        tls_port = procs.free_port(self.host) if pair is not None else None
        config = self.workdir / "nginx.conf"
        config.write_text(_nginx_config(self.workdir, self.host, port, tls_port, pair))
        self.process = procs.spawn(
            [program, "-p", str(self.workdir), "-c", str(config), "-e", "stderr"],
            self.workdir / "output.txt",
        )
        if not await procs.wait_listening(self.process, self.host, port, 10.0):
            log = procs.tail(self.workdir / "output.txt")
            await self.stop()
            raise RuntimeError(f"nginx did not start: {log}")
        cafile = str(pair[0]) if pair is not None else None
        self.address = OriginAddress(self.host, port, tls_port, cafile, "nginx")
        return self.address

    async def stop(self) -> None:
        if self.process is not None:
            await procs.stop(self.process)
            self.process = None


def _nginx_config(
    directory: Path, host: str, port: int, tls_port: int | None, pair: tuple[Path, Path] | None
) -> str:
    routes = f"""
        root {directory / "www"};
        default_type application/octet-stream;
        location = /who {{ default_type text/plain; return 200 $remote_addr; }}
    """
    tls = ""
    if tls_port is not None and pair is not None:
        tls = f"""
    server {{
        listen {host}:{tls_port} ssl;
        ssl_certificate {pair[0]};
        ssl_certificate_key {pair[1]};
        {routes}
    }}"""
    temp = directory / "tmp"
    return f"""
user root;
worker_processes 1;
daemon off;
pid {directory / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {host}:{port} backlog=4096;
        {routes}
    }}{tls}
}}
"""
