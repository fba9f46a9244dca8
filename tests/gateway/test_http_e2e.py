"""End to end over real sockets: HTTP clients -> gateway -> upstream proxies -> test origin."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import aiohttp
import pytest

from tests.gateway.conftest import StartGateway, proxy_url
from tests.support.fake_upstreams import FakeHttpProxy, FakeSocks5Proxy
from tests.support.fixtures import FakeHttpProxyFactory, FakeSocks5ProxyFactory
from tests.support.net import closed_port
from tests.support.origin import Origin, TlsMaterial, pattern, pattern_sha256
from tests.support.proxying import fetch, pool_toml


async def test_a_plain_request_through_direct(start_gateway: StartGateway, origin: Origin) -> None:
    gateway = await start_gateway()  # no pools: one direct:// upstream
    status, headers, body = await fetch(origin.url_for("/echo?x=1"), proxy_url(gateway))
    assert status == 200
    echo = json.loads(body)
    assert echo["peer"] == "127.0.0.1"
    assert echo["path"] == "/echo?x=1"
    sent = {name.lower(): value for name, value in echo["headers"]}
    assert "via" in sent
    assert "proxygate" in sent["via"]
    assert "proxygate" in headers["Via"]


async def test_requests_rotate_across_upstreams_even_on_one_connection(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    upstreams: list[FakeHttpProxy | FakeSocks5Proxy] = [
        await fake_http_proxy_factory(),
        await fake_http_proxy_factory(),
        await fake_socks5_proxy_factory(),
    ]
    gateway = await start_gateway(pool_toml(*(u.url for u in upstreams)))
    connector = aiohttp.TCPConnector(limit=1)  # one keep-alive client connection
    async with aiohttp.ClientSession(connector=connector) as session:
        peers = [
            json.loads(
                (await fetch(origin.url_for("/echo"), proxy_url(gateway), session=session))[2]
            )["peer"]
            for _ in range(6)
        ]
    assert set(peers) == {u.egress for u in upstreams}
    assert peers[:3] == peers[3:]


async def test_routing_headers_are_obeyed_and_never_forwarded(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    a, b = await fake_http_proxy_factory(), await fake_http_proxy_factory()
    gateway = await start_gateway(
        pool_toml(a.url, name="pa") + pool_toml(b.url, name="pb"), **{"gateway__default_pool": "pa"}
    )
    headers = {"X-Proxy-Pool": "pb", "X-Proxy-Session": "s1", "X-Proxy-Custom": "secret"}
    _, _, body = await fetch(origin.url_for("/echo"), proxy_url(gateway), headers=headers)
    echo = json.loads(body)
    assert echo["peer"] == b.egress
    names = {name.lower() for name, _ in echo["headers"]}
    assert not any(name.startswith("x-proxy-") for name in names)
    assert "proxy-authorization" not in names
    assert "proxy-connection" not in names
    seen_by_upstream = {name.lower() for name, _ in b.requests[-1].headers}
    assert not any(name.startswith("x-proxy-") for name in seen_by_upstream)


async def test_a_session_sticks_to_one_upstream(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    upstreams = [await fake_http_proxy_factory() for _ in range(3)]
    gateway = await start_gateway(pool_toml(*(u.url for u in upstreams)))
    for session in ("one", "two"):
        peers = {
            json.loads(
                (
                    await fetch(
                        origin.url_for("/echo"),
                        proxy_url(gateway, auth=f"alice-session-{session}:x@"),
                    )
                )[2]
            )["peer"]
            for _ in range(4)
        }
        assert len(peers) == 1


async def test_large_bodies_both_ways(start_gateway: StartGateway, origin: Origin) -> None:
    gateway = await start_gateway()
    upload = pattern(3 * 1024 * 1024 + 7)
    status, _, body = await fetch(
        origin.url_for("/upload"), proxy_url(gateway), method="POST", data=io.BytesIO(upload)
    )
    assert status == 200
    assert json.loads(body)["sha256"] == hashlib.sha256(upload).hexdigest()

    async def chunks() -> object:
        for start in range(0, len(upload), 100_000):
            yield upload[start : start + 100_000]

    async with aiohttp.ClientSession() as session:
        async with session.post(
            origin.url_for("/upload"), proxy=proxy_url(gateway), data=chunks()
        ) as response:
            assert json.loads(await response.read())["sha256"] == hashlib.sha256(upload).hexdigest()
        for suffix in ("", "?chunked=1"):
            size = 5 * 1024 * 1024 + 3
            async with session.get(
                origin.url_for(f"/bytes/{size}{suffix}"), proxy=proxy_url(gateway)
            ) as response:
                data = await response.read()
                assert hashlib.sha256(data).hexdigest() == pattern_sha256(size)


async def test_https_through_connect_and_a_socks_upstream(
    start_gateway: StartGateway,
    tls_origin: Origin,
    tls_material: TlsMaterial,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    upstream = await fake_socks5_proxy_factory()
    gateway = await start_gateway(pool_toml(upstream.url))
    connector = aiohttp.TCPConnector(ssl=tls_material.client_context())
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(tls_origin.url_for("/echo"), proxy=proxy_url(gateway)) as response,
    ):
        assert response.status == 200
        assert json.loads(await response.read())["peer"] == upstream.egress


async def test_gateway_auth(start_gateway: StartGateway, origin: Origin) -> None:
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\nusers = { alice = "s3cret" }\n'
    )
    status, headers, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 407
    assert headers["Proxy-Authenticate"] == 'Basic realm="proxygate"'
    assert "error=http_request_denied" in headers["Proxy-Status"]
    status, _, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway, auth="alice:wrong@"))
    assert status == 407
    status, _, body = await fetch(
        origin.url_for("/echo"), proxy_url(gateway, auth="alice-session-x:s3cret@")
    )
    assert status == 200
    assert "s3cret" not in body.decode()


async def test_unknown_pool_is_a_400_naming_it(start_gateway: StartGateway, origin: Origin) -> None:
    gateway = await start_gateway()
    status, headers, body = await fetch(
        origin.url_for("/echo"), proxy_url(gateway), headers={"X-Proxy-Pool": "nowhere"}
    )
    assert status == 400
    assert b"nowhere" in body
    assert "proxygate; error=http_request_error" in headers["Proxy-Status"]


async def test_a_refused_upstream_is_retried_on_another(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    good = await fake_http_proxy_factory()
    dead = f"http://127.0.0.1:{closed_port()}"
    gateway = await start_gateway(pool_toml(dead, good.url, extra="retries = 1"))
    for _ in range(4):
        status, _, body = await fetch(origin.url_for("/echo"), proxy_url(gateway))
        assert status == 200
        assert json.loads(body)["peer"] == good.egress


async def test_when_every_attempt_fails_the_answer_is_502_with_proxy_status(
    start_gateway: StartGateway, origin: Origin
) -> None:
    dead = [f"socks5://127.0.0.1:{closed_port()}" for _ in range(2)]
    gateway = await start_gateway(pool_toml(*dead, extra="retries = 3"))
    status, headers, body = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 502
    assert "error=connection_refused" in headers["Proxy-Status"]
    assert 'next-hop="up-' in headers["Proxy-Status"]
    assert b"127.0.0.1" not in body
    assert "127.0.0.1" not in headers["Proxy-Status"]


async def test_a_blackholed_upstream_times_out_with_504(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    hole = await fake_http_proxy_factory()
    hole.faults.blackhole = True
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\nconnect_timeout = 0.3\nidle_timeout = 0.4\n'
        + pool_toml(hole.url, extra="retries = 0")
    )
    # A tunnel's handshake is bounded by connect_timeout.
    reader, writer = await asyncio.open_connection(*gateway.listen_addresses[0])
    writer.write(f"CONNECT {origin.url[7:]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.read(), 5)
    assert head.startswith(b"HTTP/1.1 504 ")
    assert b"error=connection_timeout" in head
    writer.close()
    await writer.wait_closed()
    # A forwarded request that gets no answer is bounded by idle_timeout.
    status, headers, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 504
    assert "error=connection_read_timeout" in headers["Proxy-Status"]


async def test_an_upstream_407_is_a_502_for_the_client(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    picky = await fake_http_proxy_factory(auth=("u", "right"))
    wrong = picky.url.replace("right", "wrong")
    gateway = await start_gateway(pool_toml(wrong, extra="retries = 0"))
    status, headers, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 502
    assert "Proxy-Authenticate" not in headers
    right = await start_gateway(pool_toml(picky.url))
    status, _, _ = await fetch(origin.url_for("/echo"), proxy_url(right))
    assert status == 200
    assert picky.requests[-1].header("Proxy-Authorization") is not None


async def test_a_post_is_never_replayed(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    flaky = await fake_http_proxy_factory()
    flaky.faults.reset_after = 10
    spare = await fake_http_proxy_factory()
    gateway = await start_gateway(pool_toml(flaky.url, spare.url, extra="retries = 2"))
    status, _, _ = await fetch(
        origin.url_for("/upload"),
        proxy_url(gateway),
        method="POST",
        data=io.BytesIO(b"x" * 100_000),
    )
    assert status == 502
    assert len(spare.requests) == 0
    assert origin.count("/upload") <= 1


async def test_policy_and_loops_are_refused(start_gateway: StartGateway, origin: Origin) -> None:
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\ndeny_destinations = ["127.0.0.128/25"]\n'
    )
    status, headers, _ = await fetch("http://127.0.0.200:8080/", proxy_url(gateway))
    assert (status, "error=destination_ip_prohibited" in headers["Proxy-Status"]) == (403, True)
    host, port = gateway.listen_addresses[0]
    status, headers, _ = await fetch(f"http://{host}:{port}/", proxy_url(gateway))
    assert (status, "error=proxy_loop_detected" in headers["Proxy-Status"]) == (502, True)
    assert gateway.admin_address is not None
    admin_host, admin_port = gateway.admin_address
    status, _, _ = await fetch(f"http://{admin_host}:{admin_port}/healthz", proxy_url(gateway))
    assert status == 502


async def test_no_free_upstream_within_acquire_timeout_is_a_503(
    start_gateway: StartGateway, origin: Origin, echo_server: object
) -> None:
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\nacquire_timeout = 0.2\n'
        + pool_toml("direct://", extra="max_concurrency = 1")
    )
    host, port = gateway.listen_addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"CONNECT {origin.url[7:]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    await reader.readline()
    status, headers, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 503
    assert "error=connection_limit_reached" in headers["Proxy-Status"]
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET http://x/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET http://x/ HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
    ],
)
async def test_malformed_requests_get_a_precise_status(
    start_gateway: StartGateway, raw: bytes, status: int
) -> None:
    gateway = await start_gateway()
    reader, writer = await asyncio.open_connection(*gateway.listen_addresses[0])
    writer.write(raw)
    line = await reader.readline()
    assert line.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Proxy-Status: proxygate; error=http_request_error" in await reader.read()
    writer.close()
    await writer.wait_closed()


async def test_a_slow_request_head_gets_408(start_gateway: StartGateway) -> None:
    gateway = await start_gateway('[gateway]\nlisten = ["127.0.0.1:0"]\nheader_timeout = 0.2\n')
    reader, writer = await asyncio.open_connection(*gateway.listen_addresses[0])
    writer.write(b"GET http://127.0.0.1/ HTTP/1.1\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 408 ")
    writer.close()
    await writer.wait_closed()


async def test_a_bodiless_request_refused_by_an_upstream_407_tries_another(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    picky = await fake_http_proxy_factory(auth=("u", "right"))
    good = await fake_http_proxy_factory()
    gateway = await start_gateway(
        pool_toml(
            picky.url.replace("right", "wrong"),
            good.url,
            extra='selector = "first_available"\nretries = 0',
        )
    )
    status, _, body = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 200
    assert json.loads(body)["peer"] == good.egress


async def test_unspecified_destinations_are_refused(start_gateway: StartGateway) -> None:
    gateway = await start_gateway()
    _, port = gateway.listen_addresses[0]
    reader, writer = await asyncio.open_connection(*gateway.listen_addresses[0])
    writer.write(f"CONNECT 0.0.0.0:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"error=destination_ip_prohibited" in answer
    writer.close()
    await writer.wait_closed()


async def test_a_gateway_chained_to_itself_stops_at_once(start_gateway: StartGateway) -> None:
    port = closed_port()
    gateway = await start_gateway(
        f'[gateway]\nlisten = ["127.0.0.1:{port}"]\n'
        + pool_toml(f"http://127.0.0.1:{port}", extra="retries = 0")
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 502 ")
    writer.close()
    await writer.wait_closed()
    stats = await gateway.storage.stats("default", 0)
    # Only the client's CONNECT leased: the looped one was refused by its Via before leasing.
    assert stats.total_leases == 1
