"""The splice relay over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.channel import Channel
from gateway.relay import BUFFER_LIMIT, RelayEnd, RelayResult, relay


@dataclass
class Rig:
    """client app <-> [client Channel | relay | upstream Channel] <-> far end app."""

    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    far_reader: asyncio.StreamReader
    far_writer: asyncio.StreamWriter
    client_channel: Channel
    upstream_channel: Channel


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[Channel] = asyncio.Queue()
    far_ends: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    def accept() -> Channel:
        channel = Channel(loop)
        accepted.put_nowait(channel)
        return channel

    gateway_side = await loop.create_server(accept, "127.0.0.1", 0)
    far_side = await asyncio.start_server(lambda r, w: far_ends.put_nowait((r, w)), "127.0.0.1", 0)
    gw_port = gateway_side.sockets[0].getsockname()[1]
    far_port = far_side.sockets[0].getsockname()[1]
    client_reader, client_writer = await asyncio.open_connection("127.0.0.1", gw_port)
    _, upstream_channel = await loop.create_connection(lambda: Channel(loop), "127.0.0.1", far_port)
    far_reader, far_writer = await far_ends.get()
    yield Rig(
        client_reader,
        client_writer,
        far_reader,
        far_writer,
        await accepted.get(),
        upstream_channel,
    )
    for writer in (client_writer, far_writer):
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    for channel in (upstream_channel,):
        channel.close()
    await asyncio.sleep(0)
    gateway_side.close()
    far_side.close()
    await gateway_side.wait_closed()
    await far_side.wait_closed()


def start_relay(rig: Rig, idle_timeout: float = 30.0, **early: bytes) -> asyncio.Task[RelayResult]:
    return asyncio.create_task(
        relay(rig.client_channel, rig.upstream_channel, idle_timeout=idle_timeout, **early)
    )


async def test_large_transfers_both_ways_arrive_whole(rig: Rig) -> None:
    task = start_relay(rig)
    up = os.urandom(8 * 1024 * 1024)
    down = os.urandom(6 * 1024 * 1024)

    async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    async def digest(reader: asyncio.StreamReader) -> str:
        return hashlib.sha256(await reader.read()).hexdigest()

    results = await asyncio.gather(
        send(rig.client_writer, up),
        send(rig.far_writer, down),
        digest(rig.far_reader),
        digest(rig.client_reader),
    )
    assert results[2] == hashlib.sha256(up).hexdigest()
    assert results[3] == hashlib.sha256(down).hexdigest()
    result = await task
    assert (result.sent, result.received, result.end) == (len(up), len(down), RelayEnd.CLOSED)
    assert not result.upstream_broke


async def test_half_close_keeps_the_other_direction_open(rig: Rig) -> None:
    task = start_relay(rig)
    rig.client_writer.write(b"question")
    rig.client_writer.write_eof()
    assert await rig.far_reader.read() == b"question"  # EOF arrived at the far end
    rig.far_writer.write(b"answer after the client finished sending")
    await rig.far_writer.drain()
    assert await rig.client_reader.readexactly(40) == b"answer after the client finished sending"
    assert not task.done()
    rig.far_writer.write_eof()
    assert await rig.client_reader.read() == b""
    assert (await task).end is RelayEnd.CLOSED


async def test_early_bytes_go_first(rig: Rig) -> None:
    task = start_relay(rig, client_early=b"pipelined-", upstream_early=b"with-reply-")
    rig.client_writer.write(b"rest")
    rig.far_writer.write(b"rest")
    assert await rig.far_reader.readexactly(14) == b"pipelined-rest"
    assert await rig.client_reader.readexactly(15) == b"with-reply-rest"
    rig.client_writer.write_eof()
    rig.far_writer.write_eof()
    result = await task
    assert (result.sent, result.received) == (14, 15)


async def test_an_idle_tunnel_is_closed(rig: Rig) -> None:
    task = start_relay(rig, idle_timeout=0.2)
    rig.client_writer.write(b"x")
    assert await rig.far_reader.readexactly(1) == b"x"
    result = await asyncio.wait_for(task, 5.0)
    assert result.end is RelayEnd.IDLE
    assert await rig.client_reader.read() == b""


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_a_reset_is_passed_on_as_a_reset(rig: Rig) -> None:
    task = start_relay(rig)
    rig.client_writer.write(b"hello")
    assert await rig.far_reader.readexactly(5) == b"hello"
    reset(rig.far_writer)
    result = await asyncio.wait_for(task, 5.0)
    assert (result.end, result.upstream_broke) == (RelayEnd.LOST, True)
    with pytest.raises(ConnectionResetError):
        await rig.client_reader.read()


async def test_a_client_that_resets_is_not_the_upstreams_doing(rig: Rig) -> None:
    task = start_relay(rig)
    rig.far_writer.write(b"hello")
    assert await rig.client_reader.readexactly(5) == b"hello"
    reset(rig.client_writer)
    result = await asyncio.wait_for(task, 5.0)
    assert (result.end, result.upstream_broke) == (RelayEnd.LOST, False)


async def test_a_slow_reader_pauses_the_fast_writer(rig: Rig) -> None:
    task = start_relay(rig)
    # The far end reads nothing: the relay must stop reading the client instead of buffering.
    chunk = b"z" * 65536
    sent = 0

    async def write_until_blocked() -> None:
        nonlocal sent
        while True:
            rig.client_writer.write(chunk)
            sent += len(chunk)
            await rig.client_writer.drain()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(write_until_blocked(), 1.0)
    relay_transport = rig.upstream_channel.transport
    assert relay_transport is not None
    # Kernel socket buffers absorb some; the relay's own buffer stays within its limit and the
    # read that crossed it (uvloop reads up to 256 KB at a time).
    assert relay_transport.get_write_buffer_size() <= BUFFER_LIMIT + 256 * 1024
    assert sent < 64 * 1024 * 1024
    received = 0
    async with asyncio.timeout(10):
        while received < sent:
            received += len(await rig.far_reader.read(1 << 20))
    assert received == sent
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_the_relay_closes_both_sides(rig: Rig) -> None:
    task = start_relay(rig)
    rig.client_writer.write(b"x")
    assert await rig.far_reader.readexactly(1) == b"x"  # the tunnel is up
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await rig.client_reader.read() == b""
    assert await rig.far_reader.read() == b""


@pytest.mark.parametrize("side", ["client_channel", "upstream_channel"])
async def test_channels_send_small_writes_at_once(rig: Rig, side: str) -> None:
    """Nagle's algorithm stays off on both sides (latency-bound proxied traffic)."""
    channel: Channel = getattr(rig, side)
    assert channel.transport is not None
    sock = channel.transport.get_extra_info("socket")
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        rig.client_channel.close()
