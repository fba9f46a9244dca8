"""The keep-alive lane on PostgreSQL: an everyday request's lease comes from the next batched
statement, read by a callback (no coroutine for the request), and is given back without one;
a client that leaves while its lease is on the way, a pool all busy and concurrent clients
cost no lease and no miscount."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from loadtest.fleet import SimUpstream
from loadtest.scratch_storage import scratch_storage
from tests.conftest import skip_or_fail
from tests.gateway.conftest import StartGateway, leases_held
from tests.gateway.test_http_lane import get, served, sim_upstreams
from tests.gateway.test_postgres_restart import books
from tests.storage.scratch import POSTGRES_URL, postgres_unavailable
from tests.support.origin import Origin
from tests.support.proxying import pool_toml
from tests.support.raw_http import raw_connection, read_response
from tests.support.waiting import eventually

__all__ = ["sim_upstreams"]


@pytest.fixture
async def postgres_url(tmp_path: Path) -> AsyncIterator[str]:
    if reason := await postgres_unavailable():
        skip_or_fail(reason)
    async with scratch_storage(POSTGRES_URL, tmp_path) as url:
        yield url


async def pg_gateway(
    start_gateway: StartGateway, url: str, upstreams: list[SimUpstream], extra: str = ""
) -> Gateway:
    return await start_gateway(
        f'[gateway]\nlisten = ["127.0.0.1:0"]\n[checks]\nenabled = false\n'
        f'[storage]\nurl = "{url}"\n' + pool_toml(*(u.url for u in upstreams), extra=extra)
    )


def count_coroutines(gateway: Gateway) -> list[int]:
    """Counts the client connections handed to a coroutine from now on."""
    spawned = [0]
    spawn = gateway._spawn

    def counting(serving: Coroutine[Any, Any, None]) -> None:
        spawned[0] += 1
        spawn(serving)

    gateway._spawn = counting  # type: ignore[method-assign]
    return spawned


async def all_given_back(gateway: Gateway, url: str, upstreams: int) -> None:
    async def settled() -> bool:
        counted = await books(url)
        return await leases_held(gateway) == 0 and list(counted.values()) == [(0, 0)] * upstreams

    await eventually(settled, "every lease given back and counted off")
    assert gateway.manager.double_releases == 0


async def test_requests_are_leased_and_given_back_from_callbacks(
    postgres_url: str,  # first: dropped after the gateway stopped
    start_gateway: StartGateway,
    origin: Origin,
    sim_upstreams: list[SimUpstream],
) -> None:
    gateway = await pg_gateway(start_gateway, postgres_url, sim_upstreams)
    address = gateway.listen_addresses[0]
    async with raw_connection(address) as (reader, writer):
        await served(reader, writer, origin, 2)  # each upstream dialled once, by a coroutine
    spawned = count_coroutines(gateway)
    async with raw_connection(address) as (reader, writer):
        await served(reader, writer, origin, 10)
    for _ in range(4):
        async with raw_connection(address) as (reader, writer):
            await served(reader, writer, origin, 1)
    assert spawned == [0]
    # Rotated per request; the previous request's release, still in flight, may hold its
    # upstream's row when the next lease is picked, and the pick does not wait for it.
    first, second = (u.requests for u in sim_upstreams)
    assert first + second == 16
    assert abs(first - second) <= 2
    assert [u.accepted for u in sim_upstreams] == [1, 1]
    await all_given_back(gateway, postgres_url, 2)


async def test_a_client_gone_while_its_lease_is_on_the_way_leaks_nothing(
    postgres_url: str,  # first: dropped after the gateway stopped
    start_gateway: StartGateway,
    origin: Origin,
    sim_upstreams: list[SimUpstream],
) -> None:
    gateway = await pg_gateway(start_gateway, postgres_url, sim_upstreams)
    address = gateway.listen_addresses[0]
    async with raw_connection(address) as (reader, writer):
        await served(reader, writer, origin, 2)

    async def ask_and_leave(i: int) -> None:
        _, writer = await asyncio.open_connection(*address)
        writer.write(get(origin, f"/echo?i={i}"))
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset: the connection is gone, not just half-closed

    await asyncio.gather(*(ask_and_leave(i) for i in range(30)))
    await all_given_back(gateway, postgres_url, 2)
    async with raw_connection(address) as (reader, writer):
        await served(reader, writer, origin, 4)  # and the gateway serves on
    await all_given_back(gateway, postgres_url, 2)


async def test_clients_beyond_the_limit_wait_in_line_and_are_all_served(
    postgres_url: str,  # first: dropped after the gateway stopped
    start_gateway: StartGateway,
    origin: Origin,
    sim_upstreams: list[SimUpstream],
) -> None:
    gateway = await pg_gateway(
        start_gateway, postgres_url, sim_upstreams, extra="max_concurrency = 1"
    )
    address = gateway.listen_addresses[0]

    async def client(n: int) -> list[int]:
        statuses = []
        async with raw_connection(address) as (reader, writer):
            for i in range(5):
                writer.write(get(origin, f"/echo?c={n}&i={i}"))
                statuses.append((await read_response(reader)).status)
        return statuses

    answers = await asyncio.gather(*(client(n) for n in range(6)))
    assert answers == [[200] * 5] * 6
    assert sum(u.requests for u in sim_upstreams) == 30
    await all_given_back(gateway, postgres_url, 2)
