"""The steps of carrying one plain (absolute-form) HTTP request that both of its drivers share:
the coroutine in `gateway.http_proxy`, and the callback lane in `gateway.http_lane` that
serves the everyday keep-alive request without one."""

from __future__ import annotations

from collections import deque
from typing import Final

from core.models import Lease
from gateway.channel import Channel
from gateway.context import GatewayContext, Leased
from gateway.dial import basic_credentials
from gateway.dialed import DialMode
from gateway.exchange import Exchange
from gateway.express import host_value
from gateway.protocols import (
    ForwardHeaders,
    RequestEvent,
    RequestHead,
    RequestParser,
    serialize_request_head,
)

__all__ = [
    "REBOUND_HEADER",
    "REPLAYABLE",
    "begin_exchange",
    "end_attempt",
    "new_exchange",
    "rebound_headers",
]

#: On the first response after a session moved off a failed upstream: that upstream's id.
REBOUND_HEADER: Final = b"X-Proxy-Session-Rebound"
#: Methods whose bodiless requests may harmlessly go out twice (RFC 9110 9.2.2): only they are
#: sent again after a failure, and only they ride a kept connection, which its upstream may be
#: closing right now.
REPLAYABLE: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def begin_exchange(
    ctx: GatewayContext,
    client: Channel,
    parser: RequestParser,
    held: deque[RequestEvent],
    head: RequestHead,
    fields: ForwardHeaders,
    leased: Leased,
    *,
    request_read: bool,
) -> Exchange:
    """Send the request head up through `leased` and make the exchange that carries the rest
    (started by its driver)."""
    dialed = leased.dialed
    upstream_is_proxy = dialed.mode is DialMode.FORWARD
    # An absolute-form target overrides any Host field (RFC 9112 3.2.2).
    headers = [pair for pair in fields.headers if pair[0].lower() != b"host"]
    headers.append((b"Host", host_value(head.host, head.port)))
    headers.append((b"Via", ctx.via))
    if head.chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    if not ctx.connections.enabled:
        # One request per upstream connection, so its end of message is never in doubt.
        headers.append((b"Connection", b"close"))
    if upstream_is_proxy:
        target = head.target
        endpoint = leased.lease.upstream.endpoint
        if endpoint.has_credentials:
            headers.append((b"Proxy-Authorization", basic_credentials(endpoint)))
    else:
        target = head.path
    if not client.eof:  # a client that left during the dial is owed nothing upstream
        dialed.channel.write(serialize_request_head(head.method, target, headers))
    if dialed.early:
        dialed.channel.buffer[:0] = dialed.early
    return new_exchange(ctx, client, parser, held, head, leased, request_read=request_read)


def new_exchange(
    ctx: GatewayContext,
    client: Channel,
    parser: RequestParser,
    held: deque[RequestEvent],
    head: RequestHead,
    leased: Leased,
    *,
    request_read: bool,
) -> Exchange:
    """The exchange that carries a request whose head went up through `leased`."""
    return Exchange(
        client=client,
        upstream=leased.dialed.channel,
        request_parser=parser,
        held=held,
        method=head.method,
        chunked_request=head.chunked,
        client_keep_alive=head.keep_alive,
        client_version=head.http_version,
        via=ctx.via,
        idle_timeout=ctx.settings.idle_timeout,
        response_timeout=ctx.settings.response_timeout,
        upstream_is_proxy=leased.dialed.mode is DialMode.FORWARD,
        # On a retry, and in the lane, the request's end was read from the client already
        # (only bodiless requests are retried or served there).
        request_done=request_read,
        extra_headers=rebound_headers(leased.lease),
    )


def end_attempt(
    ctx: GatewayContext, head: RequestHead, leased: Leased, exchange: Exchange | None
) -> None:
    """Keep the upstream connection for another request when it can take one, else close it.
    (The lease is given back by the caller, which knows whether it may await.)"""
    dialed = leased.dialed
    if exchange is not None and exchange.upstream_reusable:
        ctx.connections.keep(leased.lease.upstream, head.host, head.port, dialed)
        return
    if (
        exchange is not None
        and exchange.upstream_ended
        and dialed.uses == 0
        and dialed.mode is DialMode.FORWARD
    ):
        ctx.connections.closed_after_one(leased.lease.upstream.id)
    dialed.channel.close()


def rebound_headers(lease: Lease) -> tuple[tuple[bytes, bytes], ...]:
    """Tells the client its session just moved: the first response on the new upstream
    names the upstream the session left."""
    if lease.rebound_from is None or lease.uses != 1:
        return ()
    return ((REBOUND_HEADER, lease.rebound_from.encode()),)
