"""The HTTP/1.1 proxy side of a client connection: absolute-form requests and CONNECT.

Each request on a keep-alive connection is routed and leased on its own; CONNECT hands the
connection over to a tunnel. The gateway re-serializes every head it forwards.
"""

from __future__ import annotations

import logging
from collections import deque

from core.models import Lease, Outcome
from gateway.channel import Channel, ChannelClosed
from gateway.context import GatewayContext, Leased
from gateway.errors import (
    AuthRequired,
    BadRequest,
    GatewayError,
    NoUpstream,
    ResponseTimeout,
    UpstreamError,
)
from gateway.exchange import Exchange, ExchangeEnd
from gateway.forwarding import (
    REPLAYABLE,
    begin_exchange,
    end_attempt,
    rebound_headers,
)
from gateway.http_lane import Attempt, HttpLane, LaneEnd
from gateway.protocols import (
    ForwardHeaders,
    HttpProtocolError,
    RequestEvent,
    RequestHead,
    RequestParser,
    error_response,
)

__all__ = ["serve_http"]

log = logging.getLogger("proxygate.http")

_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
_PROXY_AUTHENTICATE = ((b"Proxy-Authenticate", b'Basic realm="proxygate"'),)


async def serve_http(
    ctx: GatewayContext, client: Channel, listener_pool: str | None, lane: HttpLane | None = None
) -> None:
    """Serve HTTP proxy requests on `client` until it closes or an error ends it; `lane`, when
    given, served the connection so far and has just handed it over."""
    handed_over = lane is not None
    if lane is None:
        lane = HttpLane(ctx, client, RequestParser(), deque(), listener_pool)
    parser, held = lane.parser, lane.held
    settings = ctx.settings
    ahead: Lease | None = None
    while True:
        if handed_over or not held:
            # Between requests the lane listens, and serves what it can without this
            # coroutine; it wakes it for the rest.
            if handed_over:
                handed_over = False
            else:
                if ctx.draining:
                    return
                end = await lane.serve()
                if end is LaneEnd.CLOSE:
                    return
            ahead = lane.take_lease()
            if lane.error is not None:
                _answer_error(client, BadRequest(str(lane.error), status=lane.error.status))
                return
            attempt = lane.take_attempt()
            if attempt is not None:
                try:
                    if not await _forward(
                        ctx, client, parser, held, attempt.head, listener_pool, first=attempt
                    ):
                        return
                except GatewayError as exc:
                    _answer_error(client, exc)
                    return
                continue
        try:
            head = await _next_head(client, parser, held, settings.header_timeout)
        except HttpProtocolError as exc:
            _answer_error(client, BadRequest(str(exc), status=exc.status))
            return
        except TimeoutError:
            _answer_error(client, BadRequest("request head not received in time", status=408))
            return
        if head is None:
            return
        try:
            if head.method == "CONNECT":
                await _tunnel(ctx, client, parser, head, listener_pool)
                return
            taken, ahead = ahead, None
            if not await _forward(ctx, client, parser, held, head, listener_pool, lease=taken):
                return
        except GatewayError as exc:
            _answer_error(client, exc)
            return


async def _next_head(
    client: Channel, parser: RequestParser, held: deque[RequestEvent], header_timeout: float
) -> RequestHead | None:
    """The next request head, which must be complete within `header_timeout` once started
    (TimeoutError), so slow heads cannot pin a connection; None when the client closed."""
    deadline: float | None = None
    while True:
        while held:
            event = held.popleft()
            if isinstance(event, RequestHead):
                return event
        if client.buffer:
            held.extend(parser.feed(client.take_buffer()))
            continue
        # Most heads arrive whole: the clock only runs once one has to be waited for.
        now = client.loop.time()
        if deadline is None:
            deadline = now + header_timeout
        elif now >= deadline:
            raise TimeoutError
        try:
            await client.read_more(deadline - now)
        except ChannelClosed:
            held.extend(parser.feed_eof())
            if not held:
                return None


async def _tunnel(
    ctx: GatewayContext,
    client: Channel,
    parser: RequestParser,
    head: RequestHead,
    listener_pool: str | None,
) -> None:
    route = ctx.route(head.headers, listener_pool).route
    await ctx.tunnel(
        client,
        route,
        head.host,
        head.port,
        established=_established,
        client_early=parser.take_buffered(),
    )


async def _forward(
    ctx: GatewayContext,
    client: Channel,
    parser: RequestParser,
    held: deque[RequestEvent],
    head: RequestHead,
    listener_pool: str | None,
    *,
    first: Attempt | None = None,
    lease: Lease | None = None,
) -> bool:
    """Carry one absolute-form request; True when the client connection may carry on.

    With `first`, the lane made the first attempt already (routed, leased, carried, the
    connection kept or closed, the lease given back), and this goes on from how it ended.
    `lease`, taken by the lane for this request, serves the first attempt."""
    if first is not None:
        fields, route = first.fields, first.route
    else:
        try:
            fields, route, _ = ctx.route(head.headers, listener_pool)
            ctx.check_destination(head.host, head.port, tunnel=False)
        except GatewayError:
            if lease is not None:  # routed alike by the lane, so not expected; never leaked
                ctx.give_back_unused(lease)
            raise
    host, port = head.host, head.port
    has_body = head.chunked or bool(head.content_length)
    replayable = not has_body and head.method in REPLAYABLE
    reuse = replayable and ctx.connections.enabled
    tried: set[str] = set()
    auth_error: UpstreamError | None = None
    silence: _Silence | None = None
    attempt = 0
    try:
        while True:
            if first is not None:
                leased, end, exchange = first.leased, first.exchange.end, first.exchange
                first = None
            else:
                taken, lease = lease, None
                try:
                    leased = await ctx.lease_and_dial(
                        route,
                        host,
                        port,
                        tunnel=False,
                        avoid=frozenset(tried),
                        reuse=reuse,
                        lease=taken,
                    )
                except NoUpstream:
                    if auth_error is not None:
                        raise auth_error from None
                    if silence is not None:  # nobody left to ask once more
                        raise silence.timeout(ctx) from None
                    raise
                end, exchange = await _carry(
                    ctx, client, parser, held, head, fields, leased, retry=attempt > 0
                )
            attempt += 1
            upstream_id = leased.lease.upstream.id
            if end is ExchangeEnd.UPSTREAM_FAILED and exchange.overdue:
                silence = silence or _Silence()
                silence.silent.append(upstream_id)
                if not (replayable and silence.retry(ctx, route.pool)):
                    raise silence.timeout(ctx)
                tried.add(upstream_id)
                continue
            if silence is not None:
                # An answer of the target's clears it (a 5xx may be the upstream's own).
                silence.answered = exchange.response_started and exchange.outcome is Outcome.OK
            stale = end is ExchangeEnd.UPSTREAM_FAILED and leased.dialed.uses > 0
            if stale and replayable and not exchange.got_response:
                # The upstream closed the kept connection as the request went out: not its
                # fault, and nothing reached the target. Again, on a new connection.
                reuse = False
                continue
            if exchange.outcome is not Outcome.OK:
                await ctx.manager.report(upstream_id, exchange.outcome, None)
            if end is ExchangeEnd.UPSTREAM_AUTH:
                auth_error = UpstreamError(
                    exchange.outcome,
                    "upstream proxy rejected its credentials",
                    next_hop=upstream_id,
                )
                # Nothing reached the target; a bodiless request may try one other upstream.
                if has_body or tried:
                    raise auth_error
                tried.add(upstream_id)
                continue
            if end is ExchangeEnd.UPSTREAM_FAILED:
                raise UpstreamError(
                    exchange.outcome,
                    "upstream failed before answering",
                    next_hop=upstream_id,
                    retryable=False,
                )
            return end is ExchangeEnd.DONE and exchange.keep_alive
    finally:
        if silence is not None:
            await silence.settle(ctx, route.pool)


class _Silence:
    """Upstreams that sent nothing back within `response_timeout` for one request.

    A silent upstream is either dead (blackholed) or carrying the request to a slow target:
    from here the two look the same. The same request sent once more through another upstream
    tells them apart: if that one answers, the silence was the first upstream's fault (an
    upstream-side failure for its health); if it is silent too, the target is slow, which is
    held against no upstream. So a dead target never ejects the upstreams that reach it.
    """

    __slots__ = ("answered", "retrying", "silent")

    def __init__(self) -> None:
        self.silent: list[str] = []
        self.answered = False
        #: A place taken in the pool's retry budget, held until the request ends.
        self.retrying = False

    def retry(self, ctx: GatewayContext, pool: str) -> bool:
        """True when the request may go out once more, after its first silence."""
        if len(self.silent) > 1 or not ctx.retry_budget.try_retry(pool):
            return False
        self.retrying = True
        return True

    def timeout(self, ctx: GatewayContext) -> ResponseTimeout:
        return ResponseTimeout(
            f"no answer within {ctx.settings.response_timeout:g}s", next_hop=self.silent[-1]
        )

    async def settle(self, ctx: GatewayContext, pool: str) -> None:
        if self.retrying:
            ctx.retry_budget.retry_ended(pool)
        if not self.silent:
            return
        timeout = ctx.settings.response_timeout
        for upstream_id in self.silent:
            if self.answered:
                detail = f"no answer in {timeout:g}s; another upstream answered the same request"
                await ctx.manager.report(upstream_id, Outcome.PROXY_ERROR, None, detail=detail)
            else:
                await ctx.manager.report(upstream_id, Outcome.READ_TIMEOUT, None)


async def _carry(
    ctx: GatewayContext,
    client: Channel,
    parser: RequestParser,
    held: deque[RequestEvent],
    head: RequestHead,
    fields: ForwardHeaders,
    leased: Leased,
    *,
    retry: bool,
) -> tuple[ExchangeEnd, Exchange]:
    """One attempt: send the request, carry the exchange, then keep the upstream connection
    for another request (when it can take one) or close it, and give the lease back."""
    exchange: Exchange | None = None
    try:
        exchange = begin_exchange(
            ctx, client, parser, held, head, fields, leased, request_read=retry
        )
        end = await exchange.run()
    finally:
        end_attempt(ctx, head, leased, exchange)
        ctx.give_back(leased.lease)
    return end, exchange


def _established(lease: Lease) -> bytes:
    extra = rebound_headers(lease)
    if not extra:
        return _ESTABLISHED
    fields = b"".join(name + b": " + value + b"\r\n" for name, value in extra)
    return _ESTABLISHED[:-2] + fields + b"\r\n"


def _answer_error(client: Channel, error: GatewayError) -> None:
    extra = _PROXY_AUTHENTICATE if isinstance(error, AuthRequired) else ()
    client.write(
        error_response(
            error.status,
            proxy_status=error.proxy_status(),
            extra_headers=extra,
            body=f"{error.status} {error.details}\n",
        )
    )
    client.close()
