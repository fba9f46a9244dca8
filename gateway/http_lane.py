"""The keep-alive lane: everyday plain HTTP requests served from the channels' callbacks.

A client connection's lane listens from its first bytes on, and between requests; a coroutine
serves the connection only once the lane hands it over (until then there is none, or it
sleeps). A request that arrives whole, without a body, for a replayable method, routed without
error, to an upstream that can be leased at once (or, on a database, by the next statement
sent for many callers, whose answer a callback reads) and has a kept connection, is carried
start to end in callbacks: parsed, leased, sent up, its response relayed, the connection kept
and the lease given back, with no coroutine woken. Anything else (a partial head, a
body, CONNECT, a lease that needs waiting, a dial, a failed exchange) goes to the coroutine,
which carries on with the same parser and held events, the lease the lane took
(`take_lease`), or from the lane's attempt (`take_attempt`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from core.models import Lease, LeaseRequest, Outcome
from gateway.channel import Channel
from gateway.context import GatewayContext, Leased
from gateway.errors import GatewayError
from gateway.exchange import Exchange, ExchangeEnd
from gateway.forwarding import REPLAYABLE, begin_exchange, end_attempt
from gateway.protocols import (
    ForwardHeaders,
    HttpProtocolError,
    RequestEnd,
    RequestEvent,
    RequestHead,
    RequestParser,
)
from gateway.routing import Route

__all__ = ["Attempt", "HttpLane", "LaneEnd"]

_HEAD_END = b"\r\n\r\n"


class LaneEnd(Enum):
    #: The connection is over: the client left or idled out, or the gateway is draining.
    CLOSE = "close"
    #: The coroutine takes over: events in `held` (and maybe a lease for them, `take_lease`),
    #: bytes in the client's buffer, an attempt to go on from (`take_attempt`), or an error
    #: to answer (`error`).
    HANDOVER = "handover"


@dataclass(slots=True)
class Attempt:
    """A request's first attempt, made by the lane, that did not end cleanly."""

    head: RequestHead
    fields: ForwardHeaders
    route: Route
    leased: Leased
    exchange: Exchange


class HttpLane:
    __slots__ = (
        "_ahead",
        "_attempt",
        "_busy",
        "_client",
        "_ctx",
        "_held",
        "_idle_since",
        "_idle_timer",
        "_leasing",
        "_listener_pool",
        "_on_end",
        "_parser",
        "_waiter",
        "error",
    )

    def __init__(
        self,
        ctx: GatewayContext,
        client: Channel,
        parser: RequestParser,
        held: deque[RequestEvent],
        listener_pool: str | None,
    ) -> None:
        self._ctx = ctx
        self._client = client
        self._parser = parser
        self._held = held
        self._listener_pool = listener_pool
        self._waiter: asyncio.Future[LaneEnd] | None = None
        self._on_end: Callable[[HttpLane, LaneEnd], None] | None = None
        self._attempt: Attempt | None = None
        self._ahead: Lease | None = None
        #: The request being carried: its head, fields, route and lease.
        self._busy: tuple[RequestHead, ForwardHeaders, Route, Leased] | None = None
        #: The request whose lease the storage is getting: its head, fields, route and request.
        self._leasing: tuple[RequestHead, ForwardHeaders, Route, LeaseRequest] | None = None
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        #: A malformed request: the coroutine answers it.
        self.error: HttpProtocolError | None = None

    @property
    def parser(self) -> RequestParser:
        return self._parser

    @property
    def held(self) -> deque[RequestEvent]:
        return self._held

    def open(self, data: bytes, on_end: Callable[[HttpLane, LaneEnd], None]) -> None:
        """Serve a new connection from its first bytes with no coroutine at all; `on_end` is
        called when one is needed after all, or the connection is over."""
        self._on_end = on_end
        self._read_request(data)

    async def serve(self) -> LaneEnd:
        """Serve requests until one needs the coroutine, or the connection is over."""
        client = self._client
        waiter = self._waiter = client.loop.create_future()
        try:
            if client.buffer:
                self._read_request(client.take_buffer())
            else:
                self._listen()
            end: LaneEnd = await waiter
            return end
        finally:
            self._waiter = None
            if self._busy is None:  # else the exchange owns the client's callbacks
                self._stop_listening()

    def take_attempt(self) -> Attempt | None:
        attempt, self._attempt = self._attempt, None
        return attempt

    def take_lease(self) -> Lease | None:
        """A lease taken for the request the coroutine takes over, to carry it with."""
        lease, self._ahead = self._ahead, None
        return lease

    # -- between requests ---------------------------------------------------------------------

    def _listen(self) -> None:
        client = self._client
        if client.eof:
            self._end(LaneEnd.CLOSE)
            return
        ctx = self._ctx
        client.set_sink(self._on_bytes, on_eof=self._on_gone, on_lost=self._on_gone)
        ctx.idle_clients.add(client)
        self._idle_since = now = client.loop.time()
        if self._idle_timer is None:
            # One timer for the whole idle watch: re-armed when it fires, not per request.
            self._idle_timer = client.loop.call_at(
                now + ctx.settings.idle_timeout, self._check_idle
            )

    def _stop_listening(self) -> None:
        self._client.set_sink(None)
        self._ctx.idle_clients.discard(self._client)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._unowned() or self._busy or self._leasing:
            return
        client = self._client
        deadline = self._idle_since + self._ctx.settings.idle_timeout
        if client.loop.time() >= deadline:
            self._end(LaneEnd.CLOSE)
        else:
            self._idle_timer = client.loop.call_at(deadline, self._check_idle)

    def _on_gone(self, exc: BaseException | None = None) -> None:
        self._end(LaneEnd.CLOSE)

    def _on_bytes(self, data: bytes) -> None:
        """The listening sink: the client spoke between requests."""
        self._client.set_sink(None)
        self._ctx.idle_clients.discard(self._client)
        self._read_request(data)

    def _read_request(self, data: bytes) -> None:
        ctx, client = self._ctx, self._client
        if _HEAD_END not in data:
            # A head still coming in: the coroutine holds it to `header_timeout`.
            client.buffer += data
            self._end(LaneEnd.HANDOVER)
            return
        try:
            events = self._parser.feed(data)
        except HttpProtocolError as exc:
            self.error = exc
            self._end(LaneEnd.HANDOVER)
            return
        held = self._held
        held.extend(events)
        if len(events) != 2 or ctx.draining:
            self._end(LaneEnd.HANDOVER)
            return
        head, end = events
        if (
            type(head) is not RequestHead
            or type(end) is not RequestEnd
            or head.method not in REPLAYABLE
        ):
            self._end(LaneEnd.HANDOVER)
            return
        try:
            fields, route, request = ctx.route(head.headers, self._listener_pool)
            ctx.check_destination(head.host, head.port, tunnel=False)
        except GatewayError:
            self._end(LaneEnd.HANDOVER)  # the coroutine meets it again, and answers
            return
        if request is None or not ctx.connections.enabled:
            self._end(LaneEnd.HANDOVER)
            return
        lease = ctx.lease_now(request)
        if lease is None:
            pending = ctx.lease_soon(request)
            if pending is None:
                self._end(LaneEnd.HANDOVER)
                return
            self._leasing = (head, fields, route, request)
            pending.add_done_callback(self._on_leased)
            return
        self._carry(head, fields, route, lease)

    def _on_leased(self, pending: asyncio.Future[Any]) -> None:
        leasing, self._leasing = self._leasing, None
        assert leasing is not None
        head, fields, route, request = leasing
        ctx = self._ctx
        lease = ctx.leased_soon(request, pending)
        if lease is None:
            self._end(LaneEnd.HANDOVER)  # the coroutine leases, and waits or answers
        elif self._client.closed or self._unowned():
            # The client left, or the coroutine that owned the lane is gone.
            ctx.give_back_unused(lease)
            self._end(LaneEnd.CLOSE)
        elif ctx.draining:
            self._ahead = lease
            self._end(LaneEnd.HANDOVER)
        else:
            self._carry(head, fields, route, lease)

    def _carry(self, head: RequestHead, fields: ForwardHeaders, route: Route, lease: Lease) -> None:
        ctx, client, held = self._ctx, self._client, self._held
        kept = ctx.connections.borrow(lease.upstream, head.host, head.port)
        if kept is None:
            # A new connection to dial: the coroutine's work, with this lease (leasing again
            # would skip this upstream in the rotation).
            self._ahead = lease
            self._end(LaneEnd.HANDOVER)
            return
        ctx.begin_use(route.pool)
        leased = Leased(lease, kept)
        held.clear()
        self._busy = (head, fields, route, leased)
        exchange = begin_exchange(
            ctx, client, self._parser, held, head, fields, leased, request_read=True
        )
        exchange.start(self._exchange_done)

    # -- a request in flight ------------------------------------------------------------------

    def _exchange_done(self, exchange: Exchange) -> None:
        busy, self._busy = self._busy, None
        assert busy is not None
        head, fields, route, leased = busy
        ctx = self._ctx
        end_attempt(ctx, head, leased, exchange)
        ctx.give_back_soon(leased.lease)
        if exchange.end is not ExchangeEnd.DONE or exchange.outcome is not Outcome.OK:
            self._attempt = Attempt(head, fields, route, leased, exchange)
            self._end(LaneEnd.HANDOVER)
        elif not exchange.keep_alive or ctx.draining:
            self._end(LaneEnd.CLOSE)
        elif self._held or self._client.buffer:
            self._end(LaneEnd.HANDOVER)  # pipelined requests: the coroutine takes them
        else:
            self._listen()

    def _unowned(self) -> bool:
        """Neither a coroutine (`serve`) nor a callback (`open`) is there to hear the end."""
        return self._waiter is None and self._on_end is None

    def _end(self, end: LaneEnd) -> None:
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(end)
            return
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            self._stop_listening()
            on_end(self, end)
