"""The built-in active checkers: `tcp_connect`, `handshake`, `judge` and `site_reach`.

Each dials through the upstream with the gateway's own dialer, so a check sees exactly what
traffic sees, and failures carry the same outcomes (a target-side failure never counts against
the upstream).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from config import CheckSettings
from core.checks import CheckContext, Checker, CheckResult
from core.endpoints import Scheme
from core.models import Outcome, Upstream
from gateway.channel import Channel, ChannelClosed
from gateway.dial import DialMode, DialPolicy, basic_credentials, dial
from gateway.errors import UpstreamError
from gateway.protocols import (
    BodyData,
    HttpProtocolError,
    ResponseEnd,
    ResponseHead,
    ResponseParser,
    serialize_request_head,
)

__all__ = [
    "HandshakeCheck",
    "JudgeCheck",
    "SiteReachCheck",
    "TcpConnectCheck",
    "build_checkers",
    "judge_answer",
    "learn_real_ip",
]

#: Fields that tell a site a proxy is in the way (and, holding our address, who we are).
_PROXY_FIELDS = frozenset(
    {
        "via",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded",
        "forwarded-for",
        "x-real-ip",
        "client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-proxy-id",
        "proxy-connection",
    }
)
_MAX_ANSWER = 256 * 1024
_DIRECT = Upstream.from_url("direct://", "checks")


@dataclass(frozen=True, slots=True)
class _Target:
    url: str
    tls: bool
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urllib.parse.urlsplit(url)
        tls = parts.scheme.lower() == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if tls else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(url, tls, host, port, path)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    latency: float


async def _fetch(
    upstream: Upstream,
    target: _Target,
    *,
    timeout: float,
    policy: DialPolicy | None,
    ssl_context: ssl.SSLContext | None,
    http_tunnels: bool = False,
) -> _Answer:
    """GET `target` through `upstream` (an `http://` target through an HTTP proxy as traffic
    goes: in a CONNECT tunnel with `http_tunnels`). Raises UpstreamError, or HttpProtocolError
    for an answer that is not HTTP."""
    started = time.perf_counter()
    dialed = await dial(
        upstream,
        target.host,
        target.port,
        tunnel=target.tls or (http_tunnels and upstream.endpoint.is_http_proxy),
        connect_timeout=timeout,
        policy=policy,
    )
    channel = dialed.channel
    try:
        if target.tls:
            loop = asyncio.get_running_loop()
            context = ssl_context or ssl.create_default_context()
            assert channel.transport is not None
            try:
                channel.transport = await loop.start_tls(
                    channel.transport, channel, context, server_hostname=target.host
                )
            except (ssl.SSLError, OSError) as exc:
                raise UpstreamError(
                    Outcome.TARGET_ERROR, f"TLS with the site failed: {exc}"
                ) from None
        headers = [(b"Host", target.authority.encode()), (b"Connection", b"close")]
        headers.append((b"User-Agent", b"proxygate-check"))
        request_target = target.path
        if dialed.mode is DialMode.FORWARD:
            request_target = target.url
            if upstream.endpoint.has_credentials:
                headers.append((b"Proxy-Authorization", basic_credentials(upstream.endpoint)))
        channel.write(serialize_request_head("GET", request_target, headers))
        if dialed.early:
            channel.buffer[:0] = dialed.early
        status, body = await _read_answer(channel)
    finally:
        channel.close()
    return _Answer(status, body, time.perf_counter() - started)


async def _read_answer(channel: Channel) -> tuple[int, bytes]:
    parser = ResponseParser("GET")
    status = 0
    body = bytearray()
    closed = False
    while True:
        if channel.buffer:
            events = parser.feed(channel.take_buffer())
        else:
            try:
                await channel.read_more()
                continue
            except ChannelClosed:
                events, closed = parser.feed_eof(), True
        for event in events:
            if isinstance(event, ResponseHead) and event.status >= 200:
                status = event.status
            elif isinstance(event, BodyData):
                body += event.data
                if len(body) > _MAX_ANSWER:
                    raise HttpProtocolError("the answer is too large")
            elif isinstance(event, ResponseEnd):
                return status, bytes(body)
        if closed:
            if not status:
                raise HttpProtocolError("the connection closed before an answer")
            return status, bytes(body)


def judge_answer(body: bytes) -> tuple[str | None, dict[str, str]]:
    """(the caller's address, the request's fields) as a judge echoed them: JSON in the
    httpbin style (`origin`/`ip`, `headers`), or `NAME = value` lines as azenv-style judges
    print (`REMOTE_ADDR`, `HTTP_X_FORWARDED_FOR`, ...). Field names come back lower-case."""
    text = body.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        address = next(
            (
                str(document[key])
                for key in ("origin", "ip", "remote_addr", "REMOTE_ADDR", "client_ip")
                if key in document
            ),
            None,
        )
        raw = document.get("headers")
        fields = {str(k).lower(): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        return address, fields
    address = None
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        name, value = name.strip(), value.strip()
        if name == "REMOTE_ADDR":
            address = value
        elif name.startswith("HTTP_"):
            fields[name[5:].lower().replace("_", "-")] = value
    return address, fields


def _anonymity(real_ip: str | None, exit_ip: str | None, fields: dict[str, str]) -> str:
    leaked = {name: value for name, value in fields.items() if name in _PROXY_FIELDS}
    if real_ip and any(real_ip in value for value in leaked.values()):
        return "transparent"
    return "anonymous" if leaked else "elite"


def _failure(exc: UpstreamError | HttpProtocolError) -> CheckResult:
    if isinstance(exc, UpstreamError):
        return CheckResult.failed(exc.outcome, exc.details)
    return CheckResult.failed(Outcome.PROXY_ERROR, f"not an HTTP answer: {exc}")


def _refused_answer(status: int, who: str) -> CheckResult:
    """An unwanted status: a 5xx is the site's own failure; anything else (403 for a banned
    exit address, an error page of the proxy's) is held against the upstream."""
    outcome = Outcome.TARGET_ERROR if status >= 500 else Outcome.PROXY_ERROR
    return CheckResult.failed(outcome, f"{who} answered {status}")


class TcpConnectCheck:
    name = "tcp_connect"
    stage = 0
    priority = 0

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def should_skip(self, upstream: Upstream) -> bool:
        return upstream.scheme is Scheme.DIRECT

    async def check(self, upstream: Upstream, context: CheckContext) -> CheckResult:
        endpoint = upstream.endpoint
        started = time.perf_counter()
        try:
            _, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        except ConnectionRefusedError:
            return CheckResult.failed(Outcome.CONNECT_REFUSED, "connection refused")
        except OSError as exc:
            return CheckResult.failed(Outcome.CONNECT_REFUSED, exc.strerror or str(exc))
        context.tcp_latency = time.perf_counter() - started
        writer.transport.abort()
        return CheckResult.ok(context.tcp_latency)


class HandshakeCheck:
    """The upstream's own protocol (SOCKS, HTTP CONNECT, TLS to an https proxy) up to the
    point where a tunnel to the judge (or the first site) stands."""

    name = "handshake"
    stage = 1
    priority = 0

    def __init__(self, target: str, timeout: float, policy: DialPolicy | None) -> None:
        self.target = _Target.parse(target)
        self.timeout = timeout
        self.policy = policy

    def should_skip(self, upstream: Upstream) -> bool:
        return upstream.scheme is Scheme.DIRECT

    async def check(self, upstream: Upstream, context: CheckContext) -> CheckResult:
        try:
            dialed = await dial(
                upstream,
                self.target.host,
                self.target.port,
                tunnel=True,
                connect_timeout=self.timeout,
                policy=self.policy,
            )
        except UpstreamError as exc:
            return _failure(exc)
        dialed.channel.close()
        return CheckResult.ok(dialed.connect_latency)


class JudgeCheck:
    """A request through the upstream to a judge that echoes the caller: the exit address,
    the latency, and how anonymous the upstream is by the proxy fields the judge saw."""

    name = "judge"
    stage = 2
    priority = 0

    def __init__(
        self,
        url: str,
        timeout: float,
        policy: DialPolicy | None,
        ssl_context: ssl.SSLContext | None = None,
        *,
        http_tunnels: bool = False,
    ) -> None:
        self.target = _Target.parse(url)
        self.timeout = timeout
        self.policy = policy
        self.ssl_context = ssl_context
        self.http_tunnels = http_tunnels

    def should_skip(self, upstream: Upstream) -> bool:
        return False

    async def check(self, upstream: Upstream, context: CheckContext) -> CheckResult:
        try:
            answer = await _fetch(
                upstream,
                self.target,
                timeout=self.timeout,
                policy=self.policy,
                ssl_context=self.ssl_context,
                http_tunnels=self.http_tunnels,
            )
        except (UpstreamError, HttpProtocolError) as exc:
            return _failure(exc)
        if answer.status != 200:
            return _refused_answer(answer.status, "the judge")
        exit_ip, fields = judge_answer(answer.body)
        if exit_ip is None:
            return CheckResult.failed(Outcome.PROXY_ERROR, "the judge's answer has no address")
        context.exit_ip = exit_ip
        context.latency = answer.latency
        context.anonymity = _anonymity(context.real_ip, exit_ip, fields)
        return CheckResult.ok(answer.latency, f"exit {exit_ip}, {context.anonymity}")


class SiteReachCheck:
    """Every listed URL must answer 2xx or 3xx through the upstream."""

    name = "site_reach"
    stage = 3
    priority = 0

    def __init__(
        self,
        urls: tuple[str, ...],
        timeout: float,
        policy: DialPolicy | None,
        ssl_context: ssl.SSLContext | None = None,
        *,
        http_tunnels: bool = False,
    ) -> None:
        self.targets = tuple(_Target.parse(url) for url in urls)
        self.timeout = timeout
        self.policy = policy
        self.ssl_context = ssl_context
        self.http_tunnels = http_tunnels

    def should_skip(self, upstream: Upstream) -> bool:
        return not self.targets

    async def check(self, upstream: Upstream, context: CheckContext) -> CheckResult:
        answers = await asyncio.gather(*(self._reach(upstream, target) for target in self.targets))
        for failed in answers:
            if failed is not None:
                return failed
        return CheckResult.ok(detail=f"{len(self.targets)} sites answered")

    async def _reach(self, upstream: Upstream, target: _Target) -> CheckResult | None:
        try:
            answer = await _fetch(
                upstream,
                target,
                timeout=self.timeout,
                policy=self.policy,
                ssl_context=self.ssl_context,
                http_tunnels=self.http_tunnels,
            )
        except (UpstreamError, HttpProtocolError) as exc:
            return _failure(exc)
        if not 200 <= answer.status < 400:
            return _refused_answer(answer.status, target.url)
        return None


def build_checkers(
    settings: CheckSettings,
    policy: DialPolicy | None,
    ssl_context: ssl.SSLContext | None = None,
    *,
    http_tunnels: bool = False,
) -> list[Checker]:
    """The pipeline the settings describe: TCP, then the handshake toward the judge (or the
    first site), then the judge, then the sites; stages without a URL are left out.
    `http_tunnels`: plain HTTP goes through HTTP proxies in CONNECT tunnels
    (`HttpUpstreamMode.CONNECT`), and so do the checks' `http://` requests."""
    timeout = settings.timeout
    checkers: list[Checker] = [TcpConnectCheck(timeout)]
    first_url = settings.judge_url or next(iter(settings.site_reach), None)
    if first_url is not None:
        checkers.append(HandshakeCheck(first_url, timeout, policy))
    if settings.judge_url is not None:
        checkers.append(
            JudgeCheck(settings.judge_url, timeout, policy, ssl_context, http_tunnels=http_tunnels)
        )
    if settings.site_reach:
        checkers.append(
            SiteReachCheck(
                settings.site_reach, timeout, policy, ssl_context, http_tunnels=http_tunnels
            )
        )
    return checkers


async def learn_real_ip(
    judge_url: str, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> str | None:
    """Our own address as the judge sees it without an upstream (None if it cannot tell)."""
    try:
        target = _Target.parse(judge_url)
        answer = await _fetch(
            _DIRECT, target, timeout=timeout, policy=None, ssl_context=ssl_context
        )
    except (UpstreamError, HttpProtocolError, TimeoutError):
        return None
    return judge_answer(answer.body)[0] if answer.status == 200 else None
