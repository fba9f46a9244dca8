"""One accepted client connection: tell the protocol by its first byte, then serve it.

A connection starts without a coroutine: its first bytes arrive in a callback, and an HTTP
request the keep-alive lane can carry is carried there and then. A coroutine (a task of the
gateway's) takes over only when one is needed: SOCKS, a CONNECT, a dial, a body, an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from core.errors import StorageUnavailable
from gateway.channel import Channel, ChannelClosed
from gateway.context import GatewayContext
from gateway.http_lane import HttpLane, LaneEnd
from gateway.http_proxy import serve_http
from gateway.protocols import Protocol, RequestParser, detect_protocol
from gateway.socks import serve_socks4, serve_socks5

__all__ = ["open_connection", "serve_connection"]

log = logging.getLogger("proxygate.connection")

#: Runs a connection's coroutine as a task the gateway tracks.
Spawn = Callable[[Coroutine[Any, Any, None]], None]

_SERVERS = {
    Protocol.HTTP: serve_http,
    Protocol.SOCKS4: serve_socks4,
    Protocol.SOCKS5: serve_socks5,
}


def open_connection(
    ctx: GatewayContext, client: Channel, listener_pool: str | None, spawn: Spawn
) -> None:
    """Serve a client just accepted, from its first bytes on; the channel is closed once it
    is done."""
    _Opening(ctx, client, listener_pool, spawn)


class _Opening:
    """A client connection until its first bytes: they must come within `header_timeout`."""

    __slots__ = ("_client", "_ctx", "_listener_pool", "_spawn", "_timer")

    def __init__(
        self, ctx: GatewayContext, client: Channel, listener_pool: str | None, spawn: Spawn
    ) -> None:
        self._ctx = ctx
        self._client = client
        self._listener_pool = listener_pool
        self._spawn = spawn
        client.set_sink(self._first_bytes, on_eof=self._gone, on_lost=self._gone)
        self._timer: asyncio.TimerHandle | None = client.loop.call_later(
            ctx.settings.header_timeout, self._gone
        )

    def _first_bytes(self, data: bytes) -> None:
        self._stop()
        ctx, client, pool = self._ctx, self._client, self._listener_pool
        if detect_protocol(data[0]) is not Protocol.HTTP:
            client.buffer += data
            self._spawn(serve_connection(ctx, client, pool))
            return
        lane = HttpLane(ctx, client, RequestParser(), deque(), pool)
        lane.open(data, self._lane_ended)

    def _lane_ended(self, lane: HttpLane, end: LaneEnd) -> None:
        if end is LaneEnd.CLOSE:
            self._client.close()
        else:
            self._spawn(serve_connection(self._ctx, self._client, self._listener_pool, lane))

    def _gone(self, exc: BaseException | None = None) -> None:
        """The client left, or sent nothing in time."""
        self._stop()
        self._client.close()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._client.set_sink(None)


async def serve_connection(
    ctx: GatewayContext,
    client: Channel,
    listener_pool: str | None,
    lane: HttpLane | None = None,
) -> None:
    """Serve a client until it is done (HTTP from where `lane` handed it over); the channel is
    closed on every exit."""
    try:
        if lane is not None:
            await serve_http(ctx, client, listener_pool, lane)
            return
        if not client.buffer:
            await client.read_more(ctx.settings.header_timeout)
        await _SERVERS[detect_protocol(client.buffer[0])](ctx, client, listener_pool)
    except (ChannelClosed, TimeoutError, ConnectionError):
        pass
    except StorageUnavailable as exc:
        # Leasing answers 503 for this itself; this is a later step that needed the storage.
        log.warning("connection from %s ended: %s", client.peer, str(exc).partition("\n")[0])
    except Exception:
        # A bug, not a client's doing: log it for us, give the client a closed connection.
        log.exception("internal error serving %s", client.peer)
    finally:
        client.close()
