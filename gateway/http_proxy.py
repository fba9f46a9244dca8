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
from gateway.dial import DialMode, basic_credentials
from gateway.errors import (
    AuthRequired,
    BadRequest,
    GatewayError,
    NoUpstream,
    ResponseTimeout,
    UpstreamError,
)
from gateway.exchange import Exchange, ExchangeEnd
from gateway.protocols import (
    BadCredentials,
    ForwardHeaders,
    HttpProtocolError,
    RequestEvent,
    RequestHead,
    RequestParser,
    error_response,
    parse_basic_auth,
    serialize_request_head,
    split_proxy_headers,
)
from gateway.routing import Route, choose_route

__all__ = ["REBOUND_HEADER", "serve_http"]

log = logging.getLogger("proxygate.http")

_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
#: On the first response after a session moved off a failed upstream: that upstream's id.
REBOUND_HEADER = b"X-Proxy-Session-Rebound"
_PROXY_AUTHENTICATE = ((b"Proxy-Authenticate", b'Basic realm="proxygate"'),)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


async def serve_http(ctx: GatewayContext, client: Channel, listener_pool: str | None) -> None:
    """Serve HTTP proxy requests on `client` until it closes or an error ends it."""
    parser = RequestParser()
    held: deque[RequestEvent] = deque()
    settings = ctx.settings
    while True:
        if not held and not client.buffer and not await _await_next_request(ctx, client):
            return
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
            if not await _forward(ctx, client, parser, held, head, listener_pool):
                return
        except GatewayError as exc:
            _answer_error(client, exc)
            return


async def _await_next_request(ctx: GatewayContext, client: Channel) -> bool:
    """Wait while a keep-alive client is quiet between requests: False when it left, idled
    out for `idle_timeout`, or the gateway began draining (idle clients are closed then)."""
    if ctx.draining:
        return False
    ctx.idle_clients.add(client)
    try:
        await client.read_more(ctx.settings.idle_timeout)
    except (ChannelClosed, TimeoutError):
        return False
    finally:
        ctx.idle_clients.discard(client)
    return True


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


def _route(
    ctx: GatewayContext, head: RequestHead, listener_pool: str | None
) -> tuple[ForwardHeaders, Route]:
    try:
        fields = split_proxy_headers(head.headers)
    except HttpProtocolError as exc:
        raise BadRequest(str(exc), status=exc.status) from None
    username = password = None
    if fields.proxy_authorization is not None:
        try:
            username, password = parse_basic_auth(fields.proxy_authorization)
        except BadCredentials:
            raise AuthRequired("malformed proxy credentials") from None
    params = ctx.authenticate(username, password)
    route = choose_route(
        header_pool=fields.pool,
        header_session=fields.session,
        header_country=fields.country,
        username=params,
        listener_pool=listener_pool,
        default_pool=ctx.settings.default_pool,
    )
    ctx.check_via(fields.via)
    return fields, route


async def _tunnel(
    ctx: GatewayContext,
    client: Channel,
    parser: RequestParser,
    head: RequestHead,
    listener_pool: str | None,
) -> None:
    _, route = _route(ctx, head, listener_pool)
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
) -> bool:
    """Carry one absolute-form request; True when the client connection may carry on."""
    fields, route = _route(ctx, head, listener_pool)
    host, port = head.host, head.port
    ctx.check_destination(host, port, tunnel=False)
    has_body = head.chunked or bool(head.content_length)
    # Only a request that may harmlessly go out twice is sent again (RFC 9110 9.2.2), and only
    # such a request rides a kept connection, which its upstream may be closing right now.
    replayable = not has_body and head.method in _IDEMPOTENT
    reuse = replayable and ctx.connections.enabled
    tried: set[str] = set()
    auth_error: UpstreamError | None = None
    silence: _Silence | None = None
    attempt = 0
    try:
        while True:
            try:
                leased = await ctx.lease_and_dial(
                    route, host, port, tunnel=False, avoid=frozenset(tried), reuse=reuse
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
    dialed = leased.dialed
    exchange: Exchange | None = None
    try:
        upstream_is_proxy = dialed.mode is DialMode.FORWARD
        # An absolute-form target overrides any Host field (RFC 9112 3.2.2).
        headers = [pair for pair in fields.headers if pair[0].lower() != b"host"]
        headers.append((b"Host", _authority(head.host, head.port).encode()))
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
        exchange = Exchange(
            client=client,
            upstream=dialed.channel,
            request_parser=parser,
            held=held,
            method=head.method,
            chunked_request=head.chunked,
            client_keep_alive=head.keep_alive,
            client_version=head.http_version,
            via=ctx.via,
            idle_timeout=ctx.settings.idle_timeout,
            response_timeout=ctx.settings.response_timeout,
            upstream_is_proxy=upstream_is_proxy,
            # On a retry the request's end was read from the client already (only bodiless
            # requests are retried).
            request_done=retry,
            extra_headers=rebound_headers(leased.lease),
        )
        if dialed.early:
            dialed.channel.buffer[:0] = dialed.early
        end = await exchange.run()
    finally:
        if exchange is not None and exchange.upstream_reusable:
            ctx.connections.keep(
                leased.lease.upstream, head.host, head.port, dialed.channel, dialed.uses + 1
            )
        else:
            dialed.channel.close()
        await ctx.give_back(leased.lease)
    return end, exchange


def rebound_headers(lease: Lease) -> tuple[tuple[bytes, bytes], ...]:
    """Tells the client its session just moved: the first response on the new upstream
    names the upstream the session left."""
    if lease.rebound_from is None or lease.uses != 1:
        return ()
    return ((REBOUND_HEADER, lease.rebound_from.encode()),)


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


def _authority(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port == 80 else f"{host}:{port}"
