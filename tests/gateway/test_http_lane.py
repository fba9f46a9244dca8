"""Many requests on one keep-alive client connection: the everyday ones are served from the
channels' callbacks (the lane), and every other kind on the same connection still gets its
full treatment from the connection's coroutine, in order, with no lease left behind."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator

import pytest

from gateway.app import Gateway
from loadtest.fleet import SimUpstream
from tests.gateway.conftest import StartGateway, leases_held
from tests.support.origin import EchoServer, Origin, pattern
from tests.support.proxying import pool_toml
from tests.support.raw_http import (
    closed_by_peer,
    echo_of,
    raw_connection,
    read_head,
    read_response,
    request,
    stays_open,
)

LISTEN = '[gateway]\nlisten = ["127.0.0.1:0"]\n'


@pytest.fixture
async def sim_upstreams() -> AsyncIterator[list[SimUpstream]]:
    upstreams = [SimUpstream(index, "http") for index in (42, 43)]
    for upstream in upstreams:
        await upstream.start()
    yield upstreams
    for upstream in upstreams:
        await upstream.stop()


def get(origin: Origin, path: str) -> bytes:
    return request("GET", origin.url_for(path), headers=[("Host", f"127.0.0.1:{origin.port}")])


async def served(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: Origin, n: int
) -> None:
    """`n` plain requests on one connection, each answered 200 before the next goes out."""
    for i in range(n):
        writer.write(get(origin, f"/echo?i={i}"))
        assert (await read_response(reader)).status == 200


async def lane_gateway(
    start_gateway: StartGateway, upstreams: list[SimUpstream], settings: str = ""
) -> Gateway:
    return await start_gateway(LISTEN + settings + pool_toml(*(u.url for u in upstreams)))


async def test_requests_on_one_connection_rotate_and_ride_kept_connections(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for i in range(12):
            writer.write(get(origin, f"/echo?i={i}"))
            assert echo_of(await read_response(reader))["path"] == f"/echo?i={i}"
        assert await leases_held(gateway) == 0
    assert [u.requests for u in sim_upstreams] == [6, 6]
    assert [u.accepted for u in sim_upstreams] == [1, 1]
    assert gateway.context.connections.stats.reused == 10


async def test_a_head_arriving_in_pieces_after_a_served_request_is_served(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(get(origin, "/echo?i=1"))
        assert echo_of(await read_response(reader))["path"] == "/echo?i=1"
        head = get(origin, "/echo?i=2")
        for piece in (head[:10], head[10:-3], head[-3:]):
            writer.write(piece)
            await asyncio.sleep(0.05)
        assert echo_of(await read_response(reader))["path"] == "/echo?i=2"
        writer.write(get(origin, "/echo?i=3"))
        assert echo_of(await read_response(reader))["path"] == "/echo?i=3"


async def test_a_malformed_request_after_a_served_one_is_answered_400_and_closed(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(get(origin, "/echo"))
        assert (await read_response(reader)).status == 200
        writer.write(b"GET /not-absolute HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await read_response(reader)
        assert answer.status == 400
        assert "absolute" in answer.body.decode()
        assert await closed_by_peer(reader)


async def test_requests_with_bodies_and_plain_ones_interleave_on_one_connection(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    body = pattern(50_000)
    upload = request(
        "POST",
        origin.url_for("/upload"),
        headers=[("Host", f"127.0.0.1:{origin.port}"), ("Content-Length", str(len(body)))],
        body=body,
    )
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for i in range(3):
            writer.write(get(origin, f"/echo?i={i}"))
            assert echo_of(await read_response(reader))["path"] == f"/echo?i={i}"
            writer.write(upload)
            assert echo_of(await read_response(reader))["length"] == len(body)
        assert await stays_open(reader)
    assert origin.count("/upload", "POST") == 3


async def test_pipelined_requests_after_a_served_one_are_answered_in_order(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(get(origin, "/echo?i=0"))
        assert echo_of(await read_response(reader))["path"] == "/echo?i=0"
        writer.write(b"".join(get(origin, f"/echo?i={i}") for i in range(1, 5)))
        for i in range(1, 5):
            assert echo_of(await read_response(reader))["path"] == f"/echo?i={i}"
        writer.write(get(origin, "/echo?i=5"))
        assert echo_of(await read_response(reader))["path"] == "/echo?i=5"


async def test_a_connect_after_served_requests_tunnels(
    start_gateway: StartGateway,
    origin: Origin,
    echo_server: EchoServer,
    sim_upstreams: list[SimUpstream],
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    host, port = echo_server.address
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        await served(reader, writer, origin, 2)
        writer.write(request("CONNECT", f"{host}:{port}", headers=[("Host", f"{host}:{port}")]))
        assert (await read_head(reader))[1] == 200
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5.0) == b"ping"


async def test_a_target_error_passes_and_the_connection_carries_on(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for i in range(4):
            writer.write(get(origin, "/status/503"))
            answer = await read_response(reader)
            assert (answer.status, answer.body) == (503, b"status 503\n")
            writer.write(get(origin, f"/echo?i={i}"))
            assert echo_of(await read_response(reader))["path"] == f"/echo?i={i}"
    upstreams = await gateway.storage.list_upstreams("default")
    # The target's own error is held against no upstream.
    assert [u.failure_streak for u in upstreams] == [0, 0]


async def test_a_client_idle_between_requests_is_closed_after_idle_timeout(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams, "idle_timeout = 0.3\n")
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for i in range(3):
            writer.write(get(origin, f"/echo?i={i}"))
            assert (await read_response(reader)).status == 200
            await asyncio.sleep(0.15)  # activity resets the idle clock
        assert await closed_by_peer(reader)


async def test_stopping_the_gateway_closes_clients_idle_between_requests(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        await served(reader, writer, origin, 3)
        await asyncio.wait_for(gateway.stop(drain_timeout=5.0), 5.0)
        assert await closed_by_peer(reader)


async def test_a_client_leaving_mid_response_gives_its_lease_back(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        await served(reader, writer, origin, 2)
        writer.write(get(origin, "/slow?seconds=0.5"))
        await asyncio.sleep(0.1)
        assert await leases_held(gateway) == 1
    for _ in range(200):
        if await leases_held(gateway) == 0:
            break
        await asyncio.sleep(0.01)
    assert await leases_held(gateway) == 0


async def test_each_request_is_routed_by_its_own_fields(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    """Same fields, same routing; new fields (credentials, pool) are judged afresh."""
    first, second = sim_upstreams
    gateway = await start_gateway(
        '[gateway]\nlisten = ["127.0.0.1:0"]\nusers = { alice = "pw" }\ndefault_pool = "one"\n'
        + pool_toml(first.url, name="one")
        + pool_toml(second.url, name="two")
    )
    good = "Basic " + base64.b64encode(b"alice-pool-one:pw").decode()
    to_two = "Basic " + base64.b64encode(b"alice-pool-two:pw").decode()
    bad = "Basic " + base64.b64encode(b"alice-pool-one:wrong").decode()

    def get_as(credentials: str, i: int) -> bytes:
        host = ("Host", f"127.0.0.1:{origin.port}")
        auth = ("Proxy-Authorization", credentials)
        return request("GET", origin.url_for(f"/echo?i={i}"), headers=[host, auth])

    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        for i, credentials in enumerate([good, good, to_two, to_two, good]):
            writer.write(get_as(credentials, i))
            assert echo_of(await read_response(reader))["path"] == f"/echo?i={i}"
        writer.write(get_as(bad, 9))
        assert (await read_response(reader)).status == 407
    assert (first.requests, second.requests) == (3, 2)


async def test_a_client_that_sends_nothing_is_closed_after_header_timeout(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway('[gateway]\nlisten = ["127.0.0.1:0"]\nheader_timeout = 0.2\n')
    async with raw_connection(gateway.listen_addresses[0]) as (reader, _):
        assert await closed_by_peer(reader)


async def test_a_client_leaving_before_its_first_byte_is_forgotten(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway()
    for _ in range(5):
        async with raw_connection(gateway.listen_addresses[0]):
            pass
    for _ in range(200):
        if not gateway.open_connections:
            break
        await asyncio.sleep(0.01)
    assert not gateway.open_connections


async def test_stopping_waits_for_a_request_served_without_a_coroutine(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    """A request carried from callbacks alone (no task) still counts as open when the gateway
    stops: it finishes within the drain window."""
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        await served(reader, writer, origin, 2)  # kept connections to both upstreams
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(get(origin, "/slow?seconds=0.3"))
        await asyncio.sleep(0.1)
        assert gateway.connection_tasks == 0  # carried by the lane alone
        assert gateway.open_connections == 1
        stopping = asyncio.create_task(gateway.stop(drain_timeout=5.0))
        answer = await read_response(reader)
        assert (answer.status, answer.body) == (200, b"slept 0.3\n")
        await asyncio.wait_for(stopping, 5.0)


async def test_stopping_cuts_a_request_served_without_a_coroutine_after_the_drain_window(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        await served(reader, writer, origin, 2)
    async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
        writer.write(get(origin, "/slow?seconds=3"))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(gateway.stop(drain_timeout=0.2), 5.0)
        assert await closed_by_peer(reader)
    assert await leases_held(gateway) == 0


async def test_many_clients_mixing_every_kind_of_request_get_every_answer_in_order(
    start_gateway: StartGateway, origin: Origin, sim_upstreams: list[SimUpstream]
) -> None:
    """Lane and coroutine take turns on each connection, many connections at once: plain
    requests, bodies, heads in pieces, pipelined runs and target errors, in a seeded order."""
    gateway = await lane_gateway(start_gateway, sim_upstreams)
    body = pattern(3_000)
    upload = request(
        "POST",
        origin.url_for("/upload"),
        headers=[("Host", f"127.0.0.1:{origin.port}"), ("Content-Length", str(len(body)))],
        body=body,
    )

    async def client(seed: int) -> int:
        rng = random.Random(seed)
        answered = 0
        async with raw_connection(gateway.listen_addresses[0]) as (reader, writer):
            for step in range(12):
                kind = rng.choice(["get", "get", "get", "upload", "pieces", "pipelined", "503"])
                if kind == "get":
                    writer.write(get(origin, f"/echo?c={seed}&s={step}"))
                    assert (
                        echo_of(await read_response(reader))["path"] == f"/echo?c={seed}&s={step}"
                    )
                elif kind == "upload":
                    writer.write(upload)
                    assert echo_of(await read_response(reader))["length"] == len(body)
                elif kind == "pieces":
                    head = get(origin, f"/echo?c={seed}&s={step}")
                    cut = rng.randrange(1, len(head))
                    writer.write(head[:cut])
                    await asyncio.sleep(0.01)
                    writer.write(head[cut:])
                    assert (
                        echo_of(await read_response(reader))["path"] == f"/echo?c={seed}&s={step}"
                    )
                elif kind == "pipelined":
                    paths = [f"/echo?c={seed}&s={step}&p={i}" for i in range(3)]
                    writer.write(b"".join(get(origin, path) for path in paths))
                    for path in paths:
                        assert echo_of(await read_response(reader))["path"] == path
                else:
                    writer.write(get(origin, "/status/503"))
                    assert (await read_response(reader)).status == 503
                answered += 1
        return answered

    results = await asyncio.wait_for(asyncio.gather(*(client(seed) for seed in range(16))), 60)
    assert results == [12] * 16
    for _ in range(200):
        if await leases_held(gateway) == 0:
            break
        await asyncio.sleep(0.01)
    assert await leases_held(gateway) == 0
