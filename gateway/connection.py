"""One accepted client connection: tell the protocol by its first byte, then serve it."""

from __future__ import annotations

import logging

from core.errors import StorageUnavailable
from gateway.channel import Channel, ChannelClosed
from gateway.context import GatewayContext
from gateway.http_proxy import serve_http
from gateway.protocols import Protocol, detect_protocol
from gateway.socks import serve_socks4, serve_socks5

__all__ = ["serve_connection"]

log = logging.getLogger("proxygate.connection")

_SERVERS = {
    Protocol.HTTP: serve_http,
    Protocol.SOCKS4: serve_socks4,
    Protocol.SOCKS5: serve_socks5,
}


async def serve_connection(ctx: GatewayContext, client: Channel, listener_pool: str | None) -> None:
    """Serve a client until it is done; the channel is closed on every exit."""
    try:
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
