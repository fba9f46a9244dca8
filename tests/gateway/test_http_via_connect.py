"""`http_upstream_mode = "connect"`: plain HTTP through HTTP upstreams in kept CONNECT tunnels.

Upstreams that close their connection after every answer (tinyproxy, and the fake HTTP proxy)
cost a new connection per forwarded request; through a tunnel to the target, the target's own
keep-alive carries the next requests. Rotation stays per request. In forward mode the gateway
says once in its log when upstreams keep doing that.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict

import pytest

from core.models import Upstream
from gateway.app import Gateway
from loadtest.fleet import SimUpstream
from tests.gateway.conftest import StartGateway, proxy_url
from tests.support.fixtures import DebianProxyFactory, FakeHttpProxyFactory
from tests.support.origin import Origin
from tests.support.proxying import fetch, pool_toml

CONNECT_MODE = '[gateway]\nlisten = ["127.0.0.1:0"]\nhttp_upstream_mode = "connect"\n'
PASSWORD = "s3cret-upstream"
OK = b"HTTP/1.1 200 OK"


def stats(gateway: Gateway) -> dict[str, int]:
    return asdict(gateway.context.connections.stats)


async def keep_alive_gets(gateway: Gateway, url: str, n: int) -> list[bytes]:
    """`n` GETs on one client connection, one at a time: the answers' status lines."""
    host, port = gateway.listen_addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    authority = url.split("/")[2]
    lines = []
    try:
        for i in range(n):
            writer.write(f"GET {url}?i={i} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            lines.append(head.split(b"\r\n")[0])
    finally:
        writer.close()
    return lines


async def test_requests_ride_kept_tunnels_and_credentials_stay_in_the_connect(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxies = [await fake_http_proxy_factory(auth=("user", PASSWORD)) for _ in range(2)]
    gateway = await start_gateway(CONNECT_MODE + pool_toml(*(p.url for p in proxies)))
    lines = await keep_alive_gets(gateway, origin.url_for("/echo"), 10)
    assert lines == [b"HTTP/1.1 200 OK"] * 10
    # One tunnel through each upstream, opened with the credentials and kept.
    for proxy in proxies:
        assert [(r.method, r.target) for r in proxy.requests] == [
            ("CONNECT", f"127.0.0.1:{origin.port}")
        ]
        assert proxy.requests[0].header("Proxy-Authorization") is not None
    assert (stats(gateway)["reused"], stats(gateway)["missed"]) == (8, 2)
    # Still rotating per request, each in origin form, the upstream's credentials unseen.
    seen = origin.requests_for("/echo")
    assert [r.path for r in seen] == [f"/echo?i={i}" for i in range(10)]
    assert [r.peer for r in seen] == [proxies[i % 2].egress for i in range(10)]
    assert all(r.header("Proxy-Authorization") is None for r in seen)
    assert len(origin.connections) == 2


async def test_a_client_through_aiohttp_gets_the_same(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    # A new client connection per request: the tunnels are the gateway's, kept all the same.
    proxy = await fake_http_proxy_factory()
    gateway = await start_gateway(CONNECT_MODE + pool_toml(proxy.url))
    for i in range(4):
        status, _, body = await fetch(origin.url_for(f"/echo?i={i}"), proxy_url(gateway))
        assert status == 200
        assert b'"peer"' in body
    assert [r.method for r in proxy.requests] == ["CONNECT"]
    assert origin.count("/echo") == 4


async def test_a_request_with_a_body_goes_through_the_tunnel_whole(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxy = await fake_http_proxy_factory()
    gateway = await start_gateway(CONNECT_MODE + pool_toml(proxy.url))
    body = bytes(range(256)) * 1024
    status, _, answer = await fetch(
        origin.url_for("/upload"), proxy_url(gateway), method="POST", data=body
    )
    assert status == 200
    assert json.loads(answer) == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
    assert [r.method for r in proxy.requests] == ["CONNECT"]
    assert [r.path for r in origin.requests_for("/upload")] == ["/upload"]


async def test_an_upstream_refusing_the_connect_is_retried_on_another(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    refusing, willing = [await fake_http_proxy_factory() for _ in range(2)]
    refusing.faults.connect_status = 403  # as squid answers CONNECT to a port not allowed
    gateway = await start_gateway(CONNECT_MODE + pool_toml(refusing.url, willing.url))
    status, _, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 200
    assert [r.method for r in refusing.requests] == ["CONNECT"]
    assert [r.peer for r in origin.requests_for("/echo")] == [willing.egress]


async def test_tinyproxy_answers_every_request_on_kept_tunnels(
    start_gateway: StartGateway, origin: Origin, tinyproxy_factory: DebianProxyFactory
) -> None:
    proxies = [await tinyproxy_factory(auth=("user", "tinypass")) for _ in range(2)]
    gateway = await start_gateway(CONNECT_MODE + pool_toml(*(p.url for p in proxies)))
    lines = await keep_alive_gets(gateway, origin.url_for("/echo"), 12)
    assert lines == [b"HTTP/1.1 200 OK"] * 12
    egresses = [proxies[i % 2].egress for i in range(12)]
    assert [r.peer for r in origin.requests_for("/echo")] == egresses
    assert len(origin.connections) == 2
    assert (stats(gateway)["reused"], stats(gateway)["missed"]) == (10, 2)


async def test_tinyproxy_forwarding_costs_a_connection_per_request(
    start_gateway: StartGateway, origin: Origin, tinyproxy_factory: DebianProxyFactory
) -> None:
    # The default mode, for contrast: tinyproxy closes after each answer, so nothing is reused.
    proxy = await tinyproxy_factory()
    gateway = await start_gateway(pool_toml(proxy.url))
    lines = await keep_alive_gets(gateway, origin.url_for("/echo"), 4)
    assert lines == [b"HTTP/1.1 200 OK"] * 4
    assert len(origin.connections) == 4
    assert stats(gateway)["reused"] == 0


Hints = Callable[[], list[str]]


@pytest.fixture
def hints(caplog: pytest.LogCaptureFixture) -> Hints:
    """The log's hints at connect mode so far."""
    caplog.set_level(logging.INFO, "proxygate.connections")
    return lambda: [
        r.getMessage() for r in caplog.records if "http_upstream_mode" in r.getMessage()
    ]


async def test_upstreams_that_say_close_after_every_answer_get_one_hint(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    hints: Hints,
) -> None:
    proxy = await fake_http_proxy_factory()  # answers with Connection: close
    gateway = await start_gateway(pool_toml(proxy.url))
    assert await keep_alive_gets(gateway, origin.url_for("/echo"), 120) == [OK] * 120
    assert len(hints()) == 1
    assert Upstream.from_url(proxy.url, "default").id in hints()[0]
    assert str(proxy.port) not in hints()[0]  # the upstream's id, never its address


async def test_tinyproxy_closing_without_a_word_gets_the_hint_too(
    start_gateway: StartGateway,
    origin: Origin,
    tinyproxy_factory: DebianProxyFactory,
    hints: Hints,
) -> None:
    proxy = await tinyproxy_factory()
    gateway = await start_gateway(pool_toml(proxy.url))
    assert await keep_alive_gets(gateway, origin.url_for("/echo"), 120) == [OK] * 120
    for _ in range(100):  # the last closes arrive a moment after their answers
        if hints():
            break
        await asyncio.sleep(0.02)
    assert len(hints()) == 1


async def test_no_hint_where_connections_are_kept(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    hints: Hints,
) -> None:
    proxy = await fake_http_proxy_factory()
    gateway = await start_gateway(CONNECT_MODE + pool_toml(proxy.url))
    assert await keep_alive_gets(gateway, origin.url_for("/echo"), 120) == [OK] * 120
    # And forwarding to an upstream that keeps its connections open.
    keeping = SimUpstream(42, "http")
    await keeping.start()
    try:
        gateway = await start_gateway(pool_toml(keeping.url))
        assert await keep_alive_gets(gateway, origin.url_for("/echo"), 120) == [OK] * 120
        assert keeping.accepted == 1
    finally:
        await keeping.stop()
    assert hints() == []


async def test_no_hint_where_the_gateway_asked_for_the_close(
    start_gateway: StartGateway, origin: Origin, hints: Hints
) -> None:
    # With reuse off every forwarded request says Connection: close, and upstreams comply.
    keeping = SimUpstream(43, "http")
    await keeping.start()
    try:
        no_reuse = '[gateway]\nlisten = ["127.0.0.1:0"]\nkeepalive_max_idle = 0\n'
        gateway = await start_gateway(no_reuse + pool_toml(keeping.url))
        assert await keep_alive_gets(gateway, origin.url_for("/echo"), 120) == [OK] * 120
        assert keeping.accepted == 120
    finally:
        await keeping.stop()
    assert hints() == []
