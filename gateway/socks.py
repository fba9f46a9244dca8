"""The SOCKS4/4a and SOCKS5 sides of a client connection: handshake, route, lease, tunnel.

The client hears success only once the upstream tunnel is up; every failure gets the exact
reply code its error carries.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.channel import Channel, ChannelClosed
from gateway.context import GatewayContext
from gateway.errors import AuthRequired, GatewayError
from gateway.protocols import (
    Socks4Connect,
    Socks4Server,
    Socks5Auth,
    Socks5Event,
    Socks5MethodSelected,
    Socks5Server,
    SocksProtocolError,
)
from gateway.routing import UsernameParams, choose_route

__all__ = ["serve_socks4", "serve_socks5"]

log = logging.getLogger("proxygate.socks")


async def serve_socks5(ctx: GatewayContext, client: Channel, listener_pool: str | None) -> None:
    server = Socks5Server(auth_required=ctx.auth_required)
    params: UsernameParams | None = None
    try:
        async with asyncio.timeout(ctx.settings.header_timeout):
            connect = None
            while connect is None:
                for event in await _feed(client, server):
                    if isinstance(event, Socks5MethodSelected):
                        client.write(event.reply)
                    elif isinstance(event, Socks5Auth):
                        try:
                            params = ctx.authenticate(event.username, event.password)
                        except GatewayError:
                            client.write(server.auth_reply(False))
                            client.close()
                            return
                        client.write(server.auth_reply(True))
                    else:
                        connect = event
    except SocksProtocolError as exc:
        client.write(exc.reply)
        client.close()
        return
    except (TimeoutError, ChannelClosed):
        client.close()
        return
    try:
        await _tunnel(ctx, client, listener_pool, params, connect.host, connect.port, server)
    except GatewayError as exc:
        client.write(server.reply(exc.socks5_reply))
        client.close()


async def serve_socks4(ctx: GatewayContext, client: Channel, listener_pool: str | None) -> None:
    server = Socks4Server()
    try:
        async with asyncio.timeout(ctx.settings.header_timeout):
            events: list[Socks4Connect] = []
            while not events:
                if not client.buffer:
                    await client.read_more()
                events = server.feed(client.take_buffer())
    except SocksProtocolError as exc:
        client.write(exc.reply)
        client.close()
        return
    except (TimeoutError, ChannelClosed):
        client.close()
        return
    request = events[0]
    try:
        # SOCKS4 has no password: with gateway users configured it cannot authenticate.
        if ctx.auth_required:
            raise AuthRequired("SOCKS4 cannot authenticate; use SOCKS5 or HTTP")
        params = ctx.authenticate(request.userid or None, None)
        await _tunnel(ctx, client, listener_pool, params, request.host, request.port, server)
    except GatewayError:
        client.write(server.reply(False))
        client.close()


async def _feed(client: Channel, server: Socks5Server) -> list[Socks5Event]:
    while True:
        if client.buffer:
            events = server.feed(client.take_buffer())
            if events:
                return events
        await client.read_more()


async def _tunnel(
    ctx: GatewayContext,
    client: Channel,
    listener_pool: str | None,
    params: UsernameParams | None,
    host: str,
    port: int,
    server: Socks5Server | Socks4Server,
) -> None:
    route = choose_route(
        header_pool=None,
        header_session=None,
        header_country=None,
        username=params,
        listener_pool=listener_pool,
        default_pool=ctx.settings.default_pool,
    )
    established = server.reply(0) if isinstance(server, Socks5Server) else server.reply(True)
    await ctx.tunnel(
        client,
        route,
        host,
        port,
        established=established,
        client_early=server.take_buffered(),
    )
