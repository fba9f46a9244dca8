"""Health from real traffic, end to end: clients through the gateway to failing upstreams."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from core.checks import Checker, CheckScheduler
from core.clock import ManualClock
from core.models import HealthStatus, Outcome, Upstream
from gateway.app import Gateway
from gateway.checkers import HandshakeCheck, TcpConnectCheck
from gateway.forwarding import REBOUND_HEADER
from tests.gateway.conftest import StartGateway, proxy_url
from tests.support.fake_upstreams import FakeHttpProxy, FakeSocks5Proxy
from tests.support.fixtures import FakeHttpProxyFactory, FakeSocks5ProxyFactory
from tests.support.net import closed_port
from tests.support.origin import Origin
from tests.support.proxying import fetch, pool_toml
from tests.support.waiting import eventually

REBOUND = REBOUND_HEADER.decode()


def upstream_id(url: str, pool: str = "default") -> str:
    return Upstream.from_url(url, pool).id


async def attempts_with(gateway: Gateway, url: str, outcome: Outcome) -> int:
    history = await gateway.storage.history(upstream_id(url))
    return sum(1 for record in history if record.outcome is outcome)


async def connect_status(gateway: Gateway, host: str, port: int) -> int:
    """CONNECT through the gateway; the status it answered."""
    gateway_host, gateway_port = gateway.listen_addresses[0]
    reader, writer = await asyncio.open_connection(gateway_host, gateway_port)
    try:
        writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()


async def tunnel_and_read(gateway: Gateway, origin: Origin) -> bytes:
    """CONNECT to the origin through the gateway, send a GET through the tunnel, and read
    until the tunnel ends (the answer, or as much of it as came before a reset)."""
    gateway_host, gateway_port = gateway.listen_addresses[0]
    reader, writer = await asyncio.open_connection(gateway_host, gateway_port)
    target = f"{origin.host}:{origin.port}"
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(f"GET /echo HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received += chunk
        return received
    finally:
        writer.close()


async def test_a_tunnel_its_upstream_resets_midway_counts_as_a_reset_against_it(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    upstream = await fake_http_proxy_factory()
    gateway = await start_gateway(pool_toml(upstream.url))
    assert (await tunnel_and_read(gateway, origin)).startswith(b"HTTP/1.1 200")
    assert await attempts_with(gateway, upstream.url, Outcome.RESET) == 0  # ended cleanly

    upstream.faults.reset_after = 10  # bytes relayed, then a RST to the gateway
    upstream.faults.times = 1
    assert len(await tunnel_and_read(gateway, origin)) <= 10

    async def reset_recorded() -> bool:
        return await attempts_with(gateway, upstream.url, Outcome.RESET) == 1

    await eventually(reset_recorded, "the tunnel's reset in the upstream's history")
    assert await attempts_with(gateway, upstream.url, Outcome.OK) == 2  # the two dials


async def test_a_refused_upstream_among_five_is_ejected_with_no_client_failure(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    healthy = [await fake_http_proxy_factory() for _ in range(5)]
    dead = await fake_http_proxy_factory()
    await dead.refuse()
    gateway = await start_gateway(pool_toml(*(p.url for p in healthy), dead.url))
    statuses = [
        (await fetch(origin.url_for(f"/echo?r={i}"), proxy_url(gateway)))[0] for i in range(60)
    ]
    tries = await attempts_with(gateway, dead.url, Outcome.CONNECT_REFUSED)
    failures = sum(1 for status in statuses if status != 200)
    print(f"refused upstream: {tries} attempts before ejection, {failures} client failures")
    assert failures == 0
    assert tries == 5
    assert (await gateway.storage.get_upstream(upstream_id(dead.url))).status is (
        HealthStatus.EJECTED
    )
    assert sum(p.connections for p in healthy) == 60


async def test_a_blackholed_upstream_costs_one_timeout_and_the_retry_lands_elsewhere(
    start_gateway: StartGateway,
    origin: Origin,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    healthy = [await fake_socks5_proxy_factory() for _ in range(3)]
    dead = await fake_socks5_proxy_factory()
    dead.faults.blackhole = True
    toml = '[gateway]\nlisten = ["127.0.0.1:0"]\nconnect_timeout = 0.5\n'
    gateway = await start_gateway(toml + pool_toml(dead.url, *(p.url for p in healthy)))
    statuses = [
        (await fetch(origin.url_for(f"/echo?b={i}"), proxy_url(gateway)))[0] for i in range(12)
    ]
    timeouts = await attempts_with(gateway, dead.url, Outcome.CONNECT_TIMEOUT)
    print(f"blackholed upstream: {timeouts} timed-out attempts, all retried elsewhere")
    assert statuses == [200] * 12
    assert timeouts >= 1
    assert dead.connections == timeouts
    assert origin.count("/echo") == 12


async def test_a_thousand_connects_to_an_unreachable_target_eject_nothing(
    start_gateway: StartGateway, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxies = [await fake_http_proxy_factory() for _ in range(3)]
    gateway = await start_gateway(pool_toml(*(p.url for p in proxies), extra="retries = 0"))
    port = closed_port()
    slots = asyncio.Semaphore(25)

    async def one() -> int:
        async with slots:
            return await connect_status(gateway, "127.0.0.1", port)

    statuses = await asyncio.gather(*(one() for _ in range(1000)))
    assert set(statuses) == {502}
    stats = await gateway.storage.stats("default", gateway.manager.clock.now())
    assert (stats.ejected, stats.panic) == (0, False)
    for proxy in proxies:
        upstream = await gateway.storage.get_upstream(upstream_id(proxy.url))
        assert upstream.failure_streak == 0


async def test_when_every_upstream_fails_the_pool_panics_and_still_answers(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxies = [await fake_http_proxy_factory() for _ in range(4)]
    for proxy in proxies:
        await proxy.refuse()
    gateway = await start_gateway(pool_toml(*(p.url for p in proxies), extra="retries = 1"))

    async def one(i: int) -> int:
        async with asyncio.timeout(10):
            return (await fetch(origin.url_for(f"/echo?p={i}"), proxy_url(gateway)))[0]

    statuses = [await one(i) for i in range(30)]
    assert set(statuses) == {502}
    stats = await gateway.storage.stats("default", gateway.manager.clock.now())
    assert (stats.ejected, stats.active, stats.panic) == (2, 2, True)
    host, port = gateway.admin_address or ("", 0)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}/api/stats") as response,
    ):
        assert (await response.json())["pools"]["default"]["panic"] is True


async def test_ejection_ends_on_time_and_an_active_check_readmits_sooner(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    clock = ManualClock(1_000.0)
    healthy = [await fake_http_proxy_factory() for _ in range(3)]
    dead = await fake_http_proxy_factory()
    await dead.refuse()
    gateway = await start_gateway(pool_toml(dead.url, *(p.url for p in healthy)), clock=clock)
    storage = gateway.storage
    dead_id = upstream_id(dead.url)
    for i in range(20):
        assert (await fetch(origin.url_for(f"/echo?e={i}"), proxy_url(gateway)))[0] == 200
    ejected = await storage.get_upstream(dead_id)
    assert (ejected.status, ejected.ejected_until) == (HealthStatus.EJECTED, 1_030.0)
    # Its time runs out: the sweep re-admits it, and the next ejection lasts twice as long.
    clock.advance(30)
    await gateway.manager.sweep()
    assert (await storage.get_upstream(dead_id)).status is HealthStatus.ACTIVE
    for i in range(20):
        assert (await fetch(origin.url_for(f"/echo?f={i}"), proxy_url(gateway)))[0] == 200
    again = await storage.get_upstream(dead_id)
    assert (again.status, again.ejected_until) == (HealthStatus.EJECTED, 1_090.0)
    # A check while it is still down keeps it out; once it is back, a check re-admits it
    # long before its ejection would end.
    checkers: list[Checker] = [TcpConnectCheck(1.0), HandshakeCheck(origin.url, 1.0, None)]
    scheduler = CheckScheduler(gateway.manager, checkers, ejected_interval=5)
    reports = {r.upstream.id: r for r in await scheduler.run_once()}
    failure = reports[dead_id].failure
    assert failure is not None
    assert failure[0] == "tcp_connect"
    await dead.resume()
    clock.advance(5)
    reports = {r.upstream.id: r for r in await scheduler.run_once()}
    assert list(reports) == [dead_id]  # only the ejected one was due again
    assert reports[dead_id].passed
    assert (await storage.get_upstream(dead_id)).status is HealthStatus.ACTIVE
    history = await storage.history(dead_id)
    assert history[-1].source == "check"
    assert (await fetch(origin.url_for("/echo"), proxy_url(gateway)))[0] == 200


# -- sessions whose upstream fails ------------------------------------------------------------


async def bound_proxy(
    gateway: Gateway, origin: Origin, proxies: list[FakeHttpProxy], session: str
) -> FakeHttpProxy:
    before = [p.connections for p in proxies]
    status, headers, _ = await fetch(
        origin.url_for("/echo"), proxy_url(gateway), headers={"X-Proxy-Session": session}
    )
    assert status == 200
    assert REBOUND not in headers
    (used,) = [p for p, n in zip(proxies, before, strict=True) if p.connections > n]
    return used


async def test_rebind_moves_the_session_and_says_so_once(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxies = [await fake_http_proxy_factory() for _ in range(3)]
    gateway = await start_gateway(pool_toml(*(p.url for p in proxies)))
    first = await bound_proxy(gateway, origin, proxies, "s1")
    assert await bound_proxy(gateway, origin, proxies, "s1") is first
    await first.refuse()
    session = {"X-Proxy-Session": "s1"}
    status, headers, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway), headers=session)
    assert status == 200
    assert headers[REBOUND] == upstream_id(first.url)
    second = await bound_proxy(gateway, origin, proxies, "s1")
    assert second is not first


async def test_rebind_matching_keeps_the_country(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxies = [await fake_http_proxy_factory() for _ in range(4)]
    gateway = await start_gateway(
        pool_toml(*(p.url for p in proxies), extra='on_sticky_failure = "rebind_matching"')
    )
    for proxy, country in zip(proxies, ["DE", "FR", "FR", "DE"], strict=True):
        await gateway.storage.update_upstream(upstream_id(proxy.url), country=country)
    first = await bound_proxy(gateway, origin, proxies, "s1")
    assert first is proxies[0]
    await first.refuse()
    status, headers, _ = await fetch(
        origin.url_for("/echo"), proxy_url(gateway), headers={"X-Proxy-Session": "s1"}
    )
    assert (status, headers[REBOUND]) == (200, upstream_id(first.url))
    assert await bound_proxy(gateway, origin, proxies, "s1") is proxies[3]


async def test_fail_answers_502_until_the_session_expires(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    clock = ManualClock(1_000.0)
    proxies = [await fake_http_proxy_factory() for _ in range(3)]
    gateway = await start_gateway(
        pool_toml(*(p.url for p in proxies), extra='on_sticky_failure = "fail"\nsticky_ttl = 60'),
        clock=clock,
    )
    first = await bound_proxy(gateway, origin, proxies, "s1")
    await first.refuse()
    session = {"X-Proxy-Session": "s1"}
    status, headers, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway), headers=session)
    assert status == 502
    assert "error=connection_refused" in headers["Proxy-Status"]
    clock.advance(30)
    status, headers, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway), headers=session)
    assert status == 502
    assert "error=destination_unavailable" in headers["Proxy-Status"]
    assert f'next-hop="{upstream_id(first.url)}"' in headers["Proxy-Status"]
    # Other sessions and plain requests are not affected.
    assert (await bound_proxy(gateway, origin, proxies, "s2")) is not first
    clock.advance(31)
    await gateway.manager.sweep()
    assert (await bound_proxy(gateway, origin, proxies, "s1")) is not first


# -- the retry budget ---------------------------------------------------------------------------


async def test_the_retry_budget_bounds_retries_in_flight(
    start_gateway: StartGateway, origin: Origin, fake_socks5_proxy_factory: FakeSocks5ProxyFactory
) -> None:
    proxies: list[FakeSocks5Proxy] = [await fake_socks5_proxy_factory() for _ in range(6)]
    for proxy in proxies:
        proxy.faults.blackhole = True
    toml = '[gateway]\nlisten = ["127.0.0.1:0"]\nconnect_timeout = 0.3\n'
    extra = "retries = 3\nfailures_to_eject = 1000"
    gateway = await start_gateway(toml + pool_toml(*(p.url for p in proxies), extra=extra))

    async def one(i: int) -> int:
        return (await fetch(origin.url_for(f"/echo?t={i}"), proxy_url(gateway)))[0]

    statuses = await asyncio.gather(*(one(i) for i in range(20)))
    budget = gateway.context.retry_budget
    attempts = sum(p.connections for p in proxies)
    print(
        f"retry budget: {attempts} attempts for 20 requests (no budget: 80), "
        f"peak {budget.peak} retries in flight, {budget.denied} denied"
    )
    assert set(statuses) == {504}
    assert budget.peak <= 4  # 20% of 20 active requests
    assert budget.denied > 0
    assert attempts < 80
    assert budget.active("default") == budget.retrying("default") == 0


async def test_a_blackholed_http_upstream_on_plain_http_is_blamed_and_the_retry_lands_elsewhere(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    healthy = [await fake_http_proxy_factory() for _ in range(3)]
    dead = await fake_http_proxy_factory()
    dead.faults.blackhole = True  # accepts, reads, never answers
    toml = '[gateway]\nlisten = ["127.0.0.1:0"]\nresponse_timeout = 0.5\n'
    gateway = await start_gateway(toml + pool_toml(dead.url, *(p.url for p in healthy)))
    statuses = [
        (await fetch(origin.url_for(f"/echo?h={i}"), proxy_url(gateway)))[0] for i in range(12)
    ]
    blamed = await attempts_with(gateway, dead.url, Outcome.PROXY_ERROR)
    print(f"blackholed HTTP upstream: {blamed} silent attempts, each answered by a retry")
    assert statuses == [200] * 12
    assert blamed >= 1
    assert dead.connections == blamed
    assert origin.count("/echo") == 12
    for proxy in healthy:
        upstream = await gateway.storage.get_upstream(upstream_id(proxy.url))
        assert upstream.failure_streak == 0


async def test_a_silent_target_is_held_against_no_upstream(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    proxies = [await fake_http_proxy_factory() for _ in range(2)]
    toml = '[gateway]\nlisten = ["127.0.0.1:0"]\nresponse_timeout = 0.3\n'
    gateway = await start_gateway(toml + pool_toml(*(p.url for p in proxies)))
    status, headers, _ = await fetch(origin.url_for("/slow?seconds=3"), proxy_url(gateway))
    assert status == 504
    assert "error=http_response_timeout" in headers["Proxy-Status"]
    assert origin.count("/slow") == 2  # sent once more, through the other upstream
    for proxy in proxies:
        upstream = await gateway.storage.get_upstream(upstream_id(proxy.url))
        assert upstream.failure_streak == 0
        assert await attempts_with(gateway, proxy.url, Outcome.READ_TIMEOUT) == 1


async def test_a_request_with_a_body_is_not_sent_again_after_silence(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    dead = await fake_http_proxy_factory()
    dead.faults.blackhole = True
    good = await fake_http_proxy_factory()
    toml = '[gateway]\nlisten = ["127.0.0.1:0"]\nresponse_timeout = 0.3\n'
    gateway = await start_gateway(
        toml + pool_toml(dead.url, good.url, extra='selector = "first_available"')
    )
    status, headers, _ = await fetch(
        origin.url_for("/upload"), proxy_url(gateway), method="POST", data=b"x" * 10
    )
    assert status == 504
    assert "error=http_response_timeout" in headers["Proxy-Status"]
    assert (dead.connections, good.connections) == (1, 0)
    assert await attempts_with(gateway, dead.url, Outcome.READ_TIMEOUT) == 1


async def test_a_silent_upstream_alone_in_its_pool_is_a_504_not_a_503(
    start_gateway: StartGateway, origin: Origin, fake_http_proxy_factory: FakeHttpProxyFactory
) -> None:
    dead = await fake_http_proxy_factory()
    dead.faults.blackhole = True
    toml = '[gateway]\nlisten = ["127.0.0.1:0"]\nresponse_timeout = 0.3\n'
    gateway = await start_gateway(toml + pool_toml(dead.url))
    status, headers, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 504
    assert "error=http_response_timeout" in headers["Proxy-Status"]
    assert await attempts_with(gateway, dead.url, Outcome.READ_TIMEOUT) == 1
