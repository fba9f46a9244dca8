"""Everyday plain requests carried on plans (`gateway.express`), over real sockets: the bytes
that go up and come back are the ones the general path sends, and every answer that is not a
whole plain one in a single read (pieces, streams, silence, a closing upstream, a client that
pipelines or leaves, a 5xx) is handed to the general exchange without a byte lost or a lease
left behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from gateway.app import Gateway
from gateway.exchange import Exchange
from tests.gateway.conftest import StartGateway, leases_held
from tests.support.net import TcpServer, drain_forever
from tests.support.origin import Origin, pattern_sha256
from tests.support.proxying import pool_toml
from tests.support.raw_http import (
    RawResponse,
    closed_by_peer,
    echo_of,
    raw_connection,
    read_response,
    request,
)
from tests.support.waiting import eventually

LISTEN = '[gateway]\nlisten = ["127.0.0.1:0"]\n'
BODY = b"plain answer\n"
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Upstream: scripted\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY


class ScriptedProxy(TcpServer):
    """A keep-alive HTTP proxy that answers each request head it reads with the next step of
    its script (the last step repeats), and records every head exactly as it arrived.

    Steps: bytes (sent as they are), "silent" (never answer, never close), "close" (close
    without answering), ("pieces", seconds, *parts) (each part after `seconds`)."""

    def __init__(self, script: list[object] | None = None) -> None:
        super().__init__("127.0.0.1")
        self.script = list(script or [ANSWER])
        self.heads: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def targets(self) -> list[bytes]:
        """The request target of every head received, in order."""
        return [head.split(b" ")[1] for head in self.heads]

    def _next_step(self) -> object:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            step = self._next_step()
            if step == "silent":
                await drain_forever(reader)
                return
            if step == "close":
                return
            if isinstance(step, tuple):
                _, seconds, *parts = step
                for part in parts:
                    await asyncio.sleep(seconds)
                    writer.write(part)
            else:
                assert isinstance(step, bytes)
                writer.write(step)
            await writer.drain()


@pytest.fixture
async def proxies() -> AsyncIterator[list[ScriptedProxy]]:
    started: list[ScriptedProxy] = []
    yield started
    for proxy in started:
        await proxy.close()


async def scripted(proxies: list[ScriptedProxy], *scripts: list[object]) -> list[ScriptedProxy]:
    for script in scripts:
        proxies.append(await ScriptedProxy(script).start())
    return proxies


@pytest.fixture
def exchanges(monkeypatch: pytest.MonkeyPatch) -> list[Exchange]:
    """Every general exchange made while the test runs."""
    made: list[Exchange] = []
    original = Exchange.__init__

    def spy(self: Exchange, **kwargs: object) -> None:
        original(self, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(Exchange, "__init__", spy)
    return made


async def gateway_over(
    start_gateway: StartGateway, urls: list[str], settings: str = "", pool: str = ""
) -> Gateway:
    return await start_gateway(LISTEN + settings + pool_toml(*urls, extra=pool))


def get(url: str, *headers: tuple[str, str]) -> bytes:
    return request("GET", url, headers=[("Host", url.split("/")[2]), *headers])


async def exchange_raw(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    """Send `data`, read one whole response as raw bytes (head and Content-Length body)."""
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("http://127.0.0.9:8080/a/b?c=d", ()),
        ("http://Example.test/", ()),
        ("http://example.test:80", ()),
        ("HTTP://example.test:81?only=query", ()),
        (
            "http://example.test/routed",
            (
                ("X-Proxy-Pool", "default"),
                ("Proxy-Connection", "keep-alive"),
                ("Connection", "keep-alive, X-Drop"),
                ("X-Drop", "1"),
                ("Accept", "*/*"),
                ("Via", "1.1 somewhere-else"),
            ),
        ),
    ],
)
async def test_a_request_carried_on_plans_goes_up_and_comes_back_as_the_general_path_does(
    start_gateway: StartGateway,
    proxies: list[ScriptedProxy],
    exchanges: list[Exchange],
    target: str,
    extra: tuple[tuple[str, str], ...],
) -> None:
    (proxy,) = await scripted(proxies, [ANSWER])
    url = f"http://gw-user:gw-pass@{proxy.host}:{proxy.port}"
    gateway = await gateway_over(start_gateway, [url])
    data = get(target, *extra)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        first = await exchange_raw(reader, writer, data)  # a dial: the general path
        made = len(exchanges)
        second = await exchange_raw(reader, writer, data)  # a kept connection: on plans
        assert len(exchanges) == made == 1
    assert second == first
    assert proxy.heads[1] == proxy.heads[0]
    sent = proxy.heads[1].decode("latin-1")
    assert sent.startswith(f"GET {target} HTTP/1.1\r\n")
    assert "Proxy-Authorization: Basic Z3ctdXNlcjpndy1wYXNz\r\n" in sent
    for gone in ("X-Proxy-Pool", "Proxy-Connection", "X-Drop", "Connection"):
        assert f"\r\n{gone}:" not in sent
    assert len(proxy.accepted) == 1
    assert gateway.context.connections.stats.reused == 1


async def test_a_client_that_asks_to_close_gets_the_same_answer_both_ways_then_the_close(
    start_gateway: StartGateway, proxies: list[ScriptedProxy], exchanges: list[Exchange]
) -> None:
    (proxy,) = await scripted(proxies, [ANSWER])
    gateway = await gateway_over(start_gateway, [proxy.url])
    data = get("http://example.test/once", ("Connection", "close"))
    answers = []
    for _ in range(2):  # a dial, then the kept connection: the general path, then plans
        async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
            answers.append(await exchange_raw(reader, writer, data))
            assert await closed_by_peer(reader)
    assert len(exchanges) == 1
    assert answers[1] == answers[0]
    assert b"\r\nConnection: close\r\n" in answers[0]
    assert proxy.heads[1] == proxy.heads[0]
    assert b"Connection" not in proxy.heads[0]  # the upstream's connection is kept
    assert len(proxy.accepted) == 1


async def test_a_session_rides_the_plans_on_its_one_upstream_and_moves_when_it_fails(
    start_gateway: StartGateway, proxies: list[ScriptedProxy], exchanges: list[Exchange]
) -> None:
    first, second = await scripted(proxies, [ANSWER], [ANSWER])
    gateway = await gateway_over(start_gateway, [first.url, second.url])
    data = get("http://example.test/s", ("X-Proxy-Session", "s1"))
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for _ in range(2):  # plain requests: a kept connection to each upstream
            await exchange_raw(reader, writer, get("http://example.test/plain"))
        answers = [await exchange_raw(reader, writer, data) for _ in range(4)]
        assert len(exchanges) == 2  # the dials; the session's requests ride the plans
        assert await leases_held(gateway, sessions=True) == 1  # bound, idle
        assert await leases_held(gateway) == 0
        bound, other = (first, second) if len(first.heads) == 5 else (second, first)
        assert (len(bound.heads), len(other.heads)) == (5, 1)
        assert b"X-Proxy-Session" not in bound.heads[-1]
        assert len(set(answers)) == 1
        # Its upstream is ejected: the next request moves the session, and its answer says
        # from where (the general exchange adds that); then the plans carry it again.
        bound_id = next(
            u.id
            for u in await gateway.storage.list_upstreams("default")
            if u.endpoint.port == bound.port
        )
        now = gateway.manager.clock.now()
        await gateway.storage.eject(bound_id, now + 60, now)
        moved = await exchange_raw(reader, writer, data)
        assert b"\r\nX-Proxy-Session-Rebound: " + bound_id.encode() + b"\r\n" in moved
        made = len(exchanges)
        assert await exchange_raw(reader, writer, data) == answers[0]
        assert len(exchanges) == made
    assert (len(bound.heads), len(other.heads)) == (5, 3)


async def test_through_a_direct_upstream_the_origin_sees_the_same_request_both_ways(
    start_gateway: StartGateway, origin: Origin, exchanges: list[Exchange]
) -> None:
    gateway = await gateway_over(start_gateway, ["direct://"])
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for query in ("?x=1", "?x=1"):
            writer.write(get(origin.url_for("/echo" + query), ("Accept", "*/*")))
            assert echo_of(await read_response(reader))["path"] == "/echo" + query
        writer.write(get(origin.url + "?only=query"))
        assert (await read_response(reader)).status == 404  # "/?only=query" reached it
    assert len(exchanges) == 1
    first, second, third = origin.requests
    assert (second.method, second.path, second.headers) == (
        first.method,
        first.path,
        first.headers,
    )
    assert third.path == "/?only=query"


async def test_an_answer_in_pieces_is_handed_to_the_general_exchange_whole(
    start_gateway: StartGateway, proxies: list[ScriptedProxy], exchanges: list[Exchange]
) -> None:
    head, body = ANSWER.split(b"\r\n\r\n")
    script: list[object] = [ANSWER, ("pieces", 0.05, head + b"\r\n\r\n", body), ANSWER]
    (proxy,) = await scripted(proxies, script)
    gateway = await gateway_over(start_gateway, [proxy.url])
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        answers = [await read_after(reader, writer, "/p") for _ in range(3)]
    assert [a.body for a in answers] == [BODY, BODY, BODY]
    assert len(exchanges) == 2  # the dial, and the answer in pieces
    assert len(proxy.accepted) == 1  # the connection still kept after it


async def read_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> RawResponse:
    writer.write(get("http://example.test" + path))
    return await read_response(reader)


def targets(*paths: str) -> list[bytes]:
    """The request targets `read_after` sends for `paths`, as a proxy reads them."""
    return [b"http://example.test" + path.encode() for path in paths]


async def test_a_long_body_streams_through_the_general_exchange(
    start_gateway: StartGateway, origin: Origin
) -> None:
    gateway = await gateway_over(start_gateway, ["direct://"])
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for size in (100, 3_000_000, 100):
            writer.write(get(origin.url_for(f"/bytes/{size}")))
            answer = await read_response(reader)
            assert len(answer.body) == size
            assert answer.header("X-Body-Sha256") == pattern_sha256(size)


async def test_a_request_pipelined_behind_one_in_flight_is_answered_in_order(
    start_gateway: StartGateway, proxies: list[ScriptedProxy], exchanges: list[Exchange]
) -> None:
    late = ("pieces", 0.2, ANSWER.replace(b"scripted", b"late-one"))
    (proxy,) = await scripted(proxies, [ANSWER, late, ANSWER])
    gateway = await gateway_over(start_gateway, [proxy.url])
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        assert (await read_after(reader, writer, "/1")).status == 200
        writer.write(get("http://example.test/2"))
        await asyncio.sleep(0.05)  # on its way up, on plans
        writer.write(get("http://example.test/3"))
        second, third = await read_response(reader), await read_response(reader)
    assert second.header("X-Upstream") == "late-one"
    assert third.header("X-Upstream") == "scripted"
    assert proxy.targets == targets("/1", "/2", "/3")


async def test_a_kept_connection_gone_silent_times_out_and_another_upstream_answers(
    start_gateway: StartGateway, proxies: list[ScriptedProxy]
) -> None:
    silent, healthy = await scripted(proxies, [ANSWER, "silent"], [ANSWER])
    gateway = await gateway_over(
        start_gateway,
        [silent.url, healthy.url],
        settings="response_timeout = 0.5\n",
        pool='selector = "round_robin"\n',
    )
    loop = asyncio.get_running_loop()
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for i in range(2):  # one dial to each upstream
            assert (await read_after(reader, writer, f"/{i}")).status == 200
        started = loop.time()
        answer = await read_after(reader, writer, "/2")  # on plans, to the silent one
        waited = loop.time() - started
    assert answer.status == 200
    assert waited >= 0.45
    assert (len(silent.heads), len(healthy.heads)) == (2, 2)
    streaks = {
        u.endpoint.port: (u.failure_streak, u.last_error)
        for u in await gateway.storage.list_upstreams("default")
    }
    # The silence is held against the silent upstream, since another one answered.
    assert streaks[silent.port][0] == 1
    assert streaks[healthy.port] == (0, None)


async def test_a_kept_connection_closed_as_the_request_goes_out_is_retried_on_a_new_one(
    start_gateway: StartGateway, proxies: list[ScriptedProxy]
) -> None:
    (proxy,) = await scripted(proxies, [ANSWER, "close", ANSWER])
    gateway = await gateway_over(start_gateway, [proxy.url])
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        assert (await read_after(reader, writer, "/1")).body == BODY
        assert (await read_after(reader, writer, "/2")).body == BODY
    assert len(proxy.accepted) == 2
    assert proxy.targets == targets("/1", "/2", "/2")


async def test_a_client_leaving_while_its_request_is_in_flight_gives_the_lease_back(
    start_gateway: StartGateway, proxies: list[ScriptedProxy]
) -> None:
    (proxy,) = await scripted(proxies, [ANSWER, ("pieces", 0.3, ANSWER), ANSWER])
    gateway = await gateway_over(start_gateway, [proxy.url])
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        assert (await read_after(reader, writer, "/1")).status == 200
        writer.write(get("http://example.test/2"))
        await eventually(lambda: _heads(proxy, 2), "the request reached the upstream")
        assert await leases_held(gateway) == 1
    await eventually(lambda: _no_leases(gateway), "the lease was given back")
    # The answer nobody read must not be lent to the next request: a new connection serves it.
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        assert (await read_after(reader, writer, "/3")).body == BODY
    assert len(proxy.accepted) == 2


async def _heads(proxy: ScriptedProxy, n: int) -> bool:
    return len(proxy.heads) >= n


async def _no_leases(gateway: Gateway) -> bool:
    return await leases_held(gateway) == 0


async def test_retired_and_closing_connections_let_go_of_the_lane(
    start_gateway: StartGateway,
    proxies: list[ScriptedProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    closing = ANSWER.replace(b"X-Upstream", b"Connection: close\r\nX-Upstream")
    (proxy,) = await scripted(proxies, [ANSWER, ANSWER, closing, ANSWER])
    gateway = await gateway_over(start_gateway, [proxy.url], settings="keepalive_max_uses = 2\n")
    with caplog.at_level(logging.ERROR):
        async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
            for i in range(10):
                assert (await read_after(reader, writer, f"/{i}")).body == BODY
                # Let each retired or closed upstream connection's end arrive mid-lane.
                await asyncio.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert gateway.context.connections.stats.retired >= 3


@pytest.mark.parametrize(
    ("answer", "status", "body", "connections"),
    [
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\n\r\nbusy\n", 503, b"busy\n", 1),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            200,
            b"hello",
            1,
        ),
        # Bytes after the answer's end: the answer passes, the connection is never lent again.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA", 200, b"abc", 2),
    ],
    ids=["5xx", "chunked", "more-than-its-length"],
)
async def test_answers_that_need_judging_go_to_the_general_exchange(
    start_gateway: StartGateway,
    proxies: list[ScriptedProxy],
    exchanges: list[Exchange],
    answer: bytes,
    status: int,
    body: bytes,
    connections: int,
) -> None:
    (proxy,) = await scripted(proxies, [ANSWER, answer, ANSWER])
    gateway = await gateway_over(start_gateway, [proxy.url])
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        assert (await read_after(reader, writer, "/1")).body == BODY
        judged = await read_after(reader, writer, "/2")
        assert (judged.status, judged.body) == (status, body)
        assert len(exchanges) == 2
        assert (await read_after(reader, writer, "/3")).body == BODY
    assert len(proxy.accepted) == connections
