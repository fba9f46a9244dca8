"""Routing inputs one by one (country header and username, session TTL, listener pool, default
pool), the admin API, and upstream credentials that must never leak."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from core.clock import ManualClock
from core.models import Upstream
from gateway.app import Gateway
from tests.gateway.conftest import StartGateway, leases_held, proxy_url
from tests.gateway.test_socks_e2e import echo_round_trip
from tests.support.fake_upstreams import FakeHttpProxy, FakeSocks5Proxy
from tests.support.fixtures import FakeHttpProxyFactory, FakeSocks5ProxyFactory
from tests.support.net import closed_port
from tests.support.origin import EchoServer, Origin, trailer
from tests.support.proxying import fetch, pool_toml
from tests.support.raw_http import (
    authority,
    raw_connection,
    read_head,
    read_response,
    request,
)


async def peer_of_request(
    gateway: Gateway,
    origin: Origin,
    *,
    auth: str = "",
    headers: dict[str, str] | None = None,
    listener: int = 0,
) -> str:
    """The address the origin saw a request through the gateway come from."""
    host, port = gateway.listen_addresses[listener]
    status, _, body = await fetch(
        origin.url_for("/echo"), f"http://{auth}{host}:{port}", headers=headers
    )
    assert status == 200, body
    return str(json.loads(body)["peer"])


# -- routing --------------------------------------------------------------------------------------


@pytest.fixture
async def geo(
    start_gateway: StartGateway, fake_http_proxy_factory: FakeHttpProxyFactory
) -> tuple[Gateway, dict[str, FakeHttpProxy]]:
    """A gateway whose default pool has an upstream without a country, one in AR and one in DE
    (countries cannot be written in TOML, so those two are added through storage)."""
    plain, ar, de = [await fake_http_proxy_factory() for _ in range(3)]
    gateway = await start_gateway(pool_toml(plain.url))
    await gateway.storage.add_upstreams(
        [
            Upstream.from_url(ar.url, "default", country="AR"),
            Upstream.from_url(de.url, "default", country="de"),
        ]
    )
    return gateway, {"plain": plain, "AR": ar, "DE": de}


async def test_the_country_header_filters_upstreams(
    geo: tuple[Gateway, dict[str, FakeHttpProxy]], origin: Origin
) -> None:
    gateway, upstreams = geo
    for country, expected in (("AR", "AR"), ("de", "DE"), ("ar", "AR")):
        peers = {
            await peer_of_request(gateway, origin, headers={"X-Proxy-Country": country})
            for _ in range(3)
        }
        assert peers == {upstreams[expected].egress}, country
    # Without a country every upstream takes its turn.
    peers = {await peer_of_request(gateway, origin) for _ in range(3)}
    assert peers == {u.egress for u in upstreams.values()}
    # The header is the gateway's: never forwarded.
    assert all(
        request.header("X-Proxy-Country") is None
        for upstream in upstreams.values()
        for request in upstream.requests
    )


async def test_the_country_header_also_routes_a_connect(
    geo: tuple[Gateway, dict[str, FakeHttpProxy]], echo_server: EchoServer
) -> None:
    gateway, upstreams = geo
    target = authority(echo_server)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(
            request("CONNECT", target, headers=[("Host", target), ("X-Proxy-Country", "DE")])
        )
        assert (await read_head(reader))[1] == 200
        writer.write_eof()
        assert await reader.read() == trailer(0)
    assert echo_server.peers == [upstreams["DE"].egress]
    assert upstreams["DE"].requests[-1].header("X-Proxy-Country") is None


async def test_a_country_nobody_serves_is_a_503(
    geo: tuple[Gateway, dict[str, FakeHttpProxy]], origin: Origin
) -> None:
    gateway, _ = geo
    status, headers, _ = await fetch(
        origin.url_for("/echo"), proxy_url(gateway), headers={"X-Proxy-Country": "FR"}
    )
    assert status == 503
    assert "error=connection_limit_reached" in headers["Proxy-Status"]
    status, headers, _ = await fetch(
        origin.url_for("/echo"), proxy_url(gateway), headers={"X-Proxy-Country": "France"}
    )
    assert status == 400
    assert "error=http_request_error" in headers["Proxy-Status"]


async def test_the_username_country_filters_upstreams(
    geo: tuple[Gateway, dict[str, FakeHttpProxy]], origin: Origin, echo_server: EchoServer
) -> None:
    gateway, upstreams = geo
    for auth, expected in (("bob-country-ar:x@", "AR"), ("bob-country-DE:x@", "DE")):
        peers = {await peer_of_request(gateway, origin, auth=auth) for _ in range(3)}
        assert peers == {upstreams[expected].egress}, auth
    # The header wins over the username.
    peer = await peer_of_request(
        gateway, origin, auth="bob-country-ar:x@", headers={"X-Proxy-Country": "DE"}
    )
    assert peer == upstreams["DE"].egress
    # SOCKS5 reads the same username.
    url = proxy_url(gateway, "socks5", "bob-country-ar:x@")
    assert await echo_round_trip(url, echo_server) == b"ping" + trailer(4)
    assert echo_server.peers == [upstreams["AR"].egress]


async def test_a_session_ends_after_its_sessttl_and_binds_anew(
    start_gateway: StartGateway,
    origin: Origin,
    fake_http_proxy_factory: FakeHttpProxyFactory,
) -> None:
    upstreams = [await fake_http_proxy_factory() for _ in range(3)]
    gateway = await start_gateway(pool_toml(*(u.url for u in upstreams)))
    clock = ManualClock(time.time())
    gateway.manager.clock = clock  # session expiry is judged by the manager's clock

    async def session_lease(session: str) -> tuple[str, str]:
        leases = await gateway.storage.list_leases("default")
        (lease,) = [lease for lease in leases if lease.session == session]
        return lease.id, lease.upstream.id

    short, long = "carol-session-short-sessttl-1:x@", "carol-session-long:x@"
    first_short = {await peer_of_request(gateway, origin, auth=short) for _ in range(3)}
    first_long = {await peer_of_request(gateway, origin, auth=long) for _ in range(3)}
    assert len(first_short) == len(first_long) == 1
    short_lease, long_lease = await session_lease("short"), await session_lease("long")

    clock.advance(0.5)  # within the TTL: each use restarts the idle countdown
    assert {await peer_of_request(gateway, origin, auth=short)} == first_short
    clock.advance(0.6)  # 1.1 s since the first lease, 0.6 s since the last use
    assert {await peer_of_request(gateway, origin, auth=short)} == first_short
    assert await session_lease("short") == short_lease

    clock.advance(1.5)  # idle longer than sessttl=1: the session is over
    await peer_of_request(gateway, origin, auth=short)
    assert (await session_lease("short"))[0] != short_lease[0]
    # The session without sessttl keeps the pool's sticky_ttl (600 s) and its upstream.
    assert {await peer_of_request(gateway, origin, auth=long)} == first_long
    assert await session_lease("long") == long_lease


async def test_a_malformed_sessttl_is_a_400(start_gateway: StartGateway, origin: Origin) -> None:
    gateway = await start_gateway()
    for ttl in ("0", "x1", str(8 * 24 * 3600)):
        status, headers, body = await fetch(
            origin.url_for("/echo"), proxy_url(gateway, auth=f"carol-session-s-sessttl-{ttl}:x@")
        )
        assert status == 400, ttl
        assert b"sessttl" in body
        assert "error=http_request_error" in headers["Proxy-Status"]


async def test_a_listener_leases_from_its_own_pool(
    start_gateway: StartGateway,
    origin: Origin,
    echo_server: EchoServer,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
) -> None:
    a = await fake_http_proxy_factory()
    b = await fake_socks5_proxy_factory()
    c = await fake_http_proxy_factory()
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\ndefault_pool = "pa"\n'
        '[[listeners]]\nlisten = "127.0.0.1:0"\npool = "pb"\n'
        + pool_toml(a.url, name="pa")
        + pool_toml(b.url, name="pb")
        + pool_toml(c.url, name="pc")
    )
    assert len(gateway.listen_addresses) == 2
    assert await peer_of_request(gateway, origin) == a.egress
    assert await peer_of_request(gateway, origin, listener=1) == b.egress
    host, port = gateway.listen_addresses[1]
    for scheme in ("socks5", "socks4"):
        url = f"{scheme}://{host}:{port}"
        assert await echo_round_trip(url, echo_server) == b"ping" + trailer(4)
        assert echo_server.peers[-1] == b.egress
    # The username and the headers come first (README: headers, username, listener, default).
    assert await peer_of_request(gateway, origin, auth="dan-pool-pc:x@", listener=1) == c.egress
    peer = await peer_of_request(gateway, origin, headers={"X-Proxy-Pool": "pa"}, listener=1)
    assert peer == a.egress


@pytest.mark.parametrize("where", ["toml", "env"])
async def test_the_default_pool_takes_unrouted_requests(
    start_gateway: StartGateway,
    origin: Origin,
    echo_server: EchoServer,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    where: str,
) -> None:
    a, b = await fake_http_proxy_factory(), await fake_http_proxy_factory()
    pools = pool_toml(a.url, name="pa") + pool_toml(b.url, name="pb")
    if where == "toml":
        gateway = await start_gateway(
            '[gateway]\nlisten = ["127.0.0.1:0"]\ndefault_pool = "pb"\n' + pools
        )
    else:
        gateway = await start_gateway(pools, gateway__default_pool="pb")
    assert {await peer_of_request(gateway, origin) for _ in range(2)} == {b.egress}
    # A username without a pool parameter routes like no username at all.
    assert await peer_of_request(gateway, origin, auth="erin-session-z:x@") == b.egress
    assert await echo_round_trip(proxy_url(gateway, "socks5"), echo_server) == b"ping" + trailer(4)
    assert echo_server.peers == [b.egress]
    assert not a.requests


# -- admin ----------------------------------------------------------------------------------------


def admin_url(gateway: Gateway, path: str) -> str:
    assert gateway.admin_address is not None
    host, port = gateway.admin_address
    return f"http://{host}:{port}{path}"


async def test_healthz_and_stats(start_gateway: StartGateway, origin: Origin) -> None:
    gateway = await start_gateway(pool_toml("direct://") + pool_toml("direct://", name="other"))
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url(gateway, "/healthz")) as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}

        async def stats() -> dict[str, dict[str, Any]]:
            async with session.get(admin_url(gateway, "/api/stats")) as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                body = await response.json()
            assert set(body) == {"pools", "tasks", "upstream_connections", "retry_budget"}
            pools: dict[str, dict[str, Any]] = body["pools"]
            return pools

        before = await stats()
        assert set(before) == {"default", "other"}
        assert set(before["default"]) == {
            "pool",
            "total",
            "active",
            "available",
            "leased",
            "ejected",
            "leases_held",
            "total_leases",
            "collected_at",
            "panic",
            "waiting",
        }
        assert before["default"]["pool"] == "default"
        assert before["default"]["total"] == before["default"]["active"] == 1
        assert before["default"]["leases_held"] == before["default"]["waiting"] == 0
        for n in (1, 2, 3):
            status, _, _ = await fetch(origin.url_for("/echo"), proxy_url(gateway))
            assert status == 200
            after = await stats()
            assert after["default"]["total_leases"] == before["default"]["total_leases"] + n
            assert after["default"]["leases_held"] == 0
            assert after["other"] == {
                **before["other"],
                "collected_at": after["other"]["collected_at"],
            }


@pytest.mark.parametrize("where", ["toml", "env"])
async def test_the_admin_token_is_required_when_set(
    start_gateway: StartGateway, where: str
) -> None:
    token = "adm1n-t0ken"
    if where == "toml":
        gateway = await start_gateway(f'[admin]\nlisten = "127.0.0.1:0"\ntoken = "{token}"\n')
    else:
        gateway = await start_gateway(admin__token=token)
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/api/stats"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                async with session.get(admin_url(gateway, path), headers=headers) as response:
                    assert response.status == 401, (path, headers)
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                    assert token not in await response.text()
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(admin_url(gateway, path), headers=headers) as response:
                assert response.status == 200, path


# -- credentials ----------------------------------------------------------------------------------

SECRET = "Hunter2-s3cr3t-PW"


def assert_no_secret(where: str, text: str) -> None:
    assert SECRET not in text, f"the upstream password leaked into {where}"
    assert SECRET.lower() not in text.lower(), f"the upstream password leaked into {where}"


def assert_no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    assert caplog.records, "the gateway logged nothing at all: is caplog wired up?"
    for record in caplog.records:
        assert_no_secret(f"log record {record.name}", record.getMessage())
        assert_no_secret(f"log record {record.name}", repr(record.args))
        if record.exc_info is not None:
            assert_no_secret(
                f"log record {record.name}", logging.Formatter().formatException(record.exc_info)
            )


@pytest.mark.parametrize("scheme", ["http", "socks5", "socks4", "https"])
async def test_a_refused_upstream_never_shows_its_password(
    start_gateway: StartGateway,
    origin: Origin,
    echo_server: EchoServer,
    caplog: pytest.LogCaptureFixture,
    scheme: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    user = "" if scheme == "socks4" else f"user:{SECRET}@"
    if scheme == "socks4":
        user = f"{SECRET}@"  # SOCKS4 has a user id only; keep the secret there
    dead = f"{scheme}://{user}127.0.0.1:{closed_port()}"
    gateway = await start_gateway(pool_toml(dead, extra="retries = 0"))
    status, headers, body = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 502
    assert "error=connection_refused" in headers["Proxy-Status"]
    assert_no_secret("the response", json.dumps(headers) + body.decode())
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        target = authority(echo_server)
        writer.write(request("CONNECT", target, headers=[("Host", target)]))
        response = await read_response(reader)
        assert response.status == 502
        assert_no_secret("the CONNECT response", repr(response))
    assert await leases_held(gateway) == 0
    assert_no_secret_in_logs(caplog)


@pytest.mark.parametrize("kind", ["http", "socks5"])
async def test_an_upstream_rejecting_its_password_never_shows_it(
    start_gateway: StartGateway,
    origin: Origin,
    echo_server: EchoServer,
    fake_http_proxy_factory: FakeHttpProxyFactory,
    fake_socks5_proxy_factory: FakeSocks5ProxyFactory,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream: FakeHttpProxy | FakeSocks5Proxy
    if kind == "http":
        upstream = await fake_http_proxy_factory(auth=("user", "the-right-one"))
    else:
        upstream = await fake_socks5_proxy_factory(auth=("user", "the-right-one"))
    wrong = upstream.url.replace("the-right-one", SECRET)
    gateway = await start_gateway(pool_toml(wrong, extra="retries = 0"))
    status, headers, body = await fetch(origin.url_for("/echo"), proxy_url(gateway))
    assert status == 502
    assert "Proxy-Authenticate" not in headers
    assert_no_secret("the response", json.dumps(headers) + body.decode())
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        target = authority(echo_server)
        writer.write(request("CONNECT", target, headers=[("Host", target)]))
        response = await read_response(reader)
        assert response.status == 502
        assert_no_secret("the CONNECT response", repr(response))
    assert_no_secret_in_logs(caplog)
