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

The plainest of these requests (HTTP/1.1, a GET-like method, an `http://name[:port]` target) is
carried on the express plans (`gateway.express`: what a header section, a target and an
answer's head become, decided once each): no parser event, no exchange object, no timer of its
own. Its answer is relayed if it comes whole in one read; anything else about it (an answer in
pieces, silence, either side closing, the client pipelining) hands it to a general exchange,
which goes on from where it stands.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, cast

from core.models import Lease, LeaseRequest, Outcome
from gateway.channel import Channel
from gateway.context import GatewayContext, Leased
from gateway.dialed import DialMode
from gateway.errors import GatewayError
from gateway.exchange import Exchange, ExchangeEnd
from gateway.express import (
    MAX_REQUEST_LINE,
    RequestPlan,
    ResponsePlan,
    Target,
    split_request_line,
)
from gateway.forwarding import REPLAYABLE, begin_exchange, end_attempt, new_exchange
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

_HEAD_END: Final = b"\r\n\r\n"
#: A request line `split_request_line` served: where it, its method and its authority end.
_Line = tuple[int, int, int]
#: Bytes of a whole response below which its head and body go out joined (one copy, one
#: buffer) rather than as two buffers.
_JOIN_BELOW: Final = 16 * 1024


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
        "_carrying",
        "_client",
        "_ctx",
        "_held",
        "_idle_since",
        "_leasing",
        "_leasing_on_plans",
        "_listener_pool",
        "_on_client_bytes",
        "_on_client_gone",
        "_on_end",
        "_on_request_bytes",
        "_on_response_bytes",
        "_on_side_gone",
        "_parser",
        "_parser_at_rest",
        "_plans",
        "_sent_at",
        "_waiter",
        "_watch",
        "_watch_step",
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
        #: The parser was found at rest, and nobody has fed it since: requests carried on
        #: plans never do, and asking it again costs an interpreted call per request.
        self._parser_at_rest = False
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
        #: The same for a request carried on plans: its bytes, request line (where it, its
        #: method and its authority end) and plans.
        self._leasing_on_plans: tuple[bytes, _Line, RequestPlan, Target] | None = None
        #: The request carried on plans (no exchange object): its bytes, plans and lease.
        self._carrying: tuple[bytes, RequestPlan, Target, Leased] | None = None
        self._plans = ctx.express.requests_for(listener_pool)
        self._sent_at = 0.0
        self._idle_since = 0.0
        #: One timer watches both the idle client and the response of a request carried on
        #: plans; it fires at most `_watch_step` after it is set, so no request re-arms it.
        self._watch: asyncio.TimerHandle | None = None
        settings = ctx.settings
        self._watch_step = min(settings.response_timeout, settings.idle_timeout)
        # Bound once: a bound method is an object made on every attribute read.
        self._on_client_bytes = self._on_bytes
        self._on_client_gone = self._on_gone
        self._on_request_bytes = self._client_spoke
        self._on_response_bytes = self._response_bytes
        self._on_side_gone = self._side_gone
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
        self._parser_at_rest = False  # the coroutine may have fed it
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
            if self._busy is None and self._carrying is None:
                self._stop_listening()  # else the request in flight owns the callbacks

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
        gone = self._on_client_gone
        client.set_sink(self._on_client_bytes, on_eof=gone, on_lost=gone)
        ctx.idle_clients.add(client)
        self._idle_since = now = client.loop.time()
        if self._watch is None:
            self._watch = client.loop.call_at(now + self._watch_step, self._check_time)

    def _stop_listening(self) -> None:
        self._client.set_sink(None)
        self._ctx.idle_clients.discard(self._client)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _check_time(self) -> None:
        """The watch: a response overdue, or an idle client's time up."""
        self._watch = None
        if self._unowned():
            return
        loop = self._client.loop
        now = loop.time()
        if self._carrying is not None:
            deadline = self._sent_at + self._watch_step
            if now >= deadline:
                self._take_over().expire()
            else:
                self._watch = loop.call_at(deadline, self._check_time)
            return
        if self._busy or self._leasing or self._leasing_on_plans:
            return  # the exchange keeps its own time; listening again re-arms the watch
        deadline = self._idle_since + self._ctx.settings.idle_timeout
        if now >= deadline:
            self._end(LaneEnd.CLOSE)
        else:
            # Never later than a step ahead: a request may start at any moment.
            self._watch = loop.call_at(min(deadline, now + self._watch_step), self._check_time)

    def _on_gone(self, exc: BaseException | None = None) -> None:
        self._end(LaneEnd.CLOSE)

    def _on_bytes(self, data: bytes) -> None:
        """The listening sink: the client spoke between requests."""
        self._client.set_sink(None)
        self._ctx.idle_clients.discard(self._client)
        self._read_request(data)

    def _read_request(self, data: bytes) -> None:
        if self._carry_on_plans(data):
            return
        self._parser_at_rest = False  # fed from here on
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
        if not ctx.connections.enabled:
            self._end(LaneEnd.HANDOVER)
            return
        taken = ctx.take_now(request)
        if taken is None:
            self._end(LaneEnd.HANDOVER)
        elif type(taken) is Lease:
            self._carry(head, fields, route, taken)
        else:
            self._leasing = (head, fields, route, request)
            cast("asyncio.Future[Any]", taken).add_done_callback(self._on_leased)

    def _on_leased(self, pending: asyncio.Future[Any]) -> None:
        leasing, self._leasing = self._leasing, None
        assert leasing is not None
        head, fields, route, request = leasing
        ctx = self._ctx
        lease = ctx.taken(request, pending)
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

    # -- a request carried on plans ----------------------------------------------------------

    def _carry_on_plans(self, data: bytes) -> bool:
        """Carry a whole bodiless request of the plainest shape on the express plans, with no
        parser event or exchange object; False (nothing done) for the general path."""
        ctx = self._ctx
        end = data.find(_HEAD_END)
        if end + 4 != len(data) or self._held or ctx.draining:
            return False
        if not self._parser_at_rest:
            if not self._parser.at_rest:
                return False
            self._parser_at_rest = True
        line_end = data.find(b"\r\n")
        if line_end > MAX_REQUEST_LINE:
            return False
        method_end, authority_end = split_request_line(data, line_end)
        if authority_end < 0:
            return False
        line = (line_end, method_end, authority_end)
        express = ctx.express
        fields = data[line_end + 2 :]
        # Looked up twice, not with a sentinel default: compiled, a value that is not a plan
        # fails the declared type.
        plans = self._plans
        plan = (
            plans[fields]
            if fields in plans
            else express.plan_request(plans, fields, self._listener_pool)
        )
        if plan is None or not ctx.connections.enabled:
            return False
        authority = data[method_end + 8 : authority_end]  # after " http://"
        target = express.targets.get(authority) or express.plan_target(authority)
        if target is None:
            return False
        taken = ctx.take_now(plan.request)
        if taken is None:
            return False  # waiting in line, or an error to answer: the general path
        if type(taken) is Lease:
            self._send_on_plans(data, line, plan, target, taken)
            return True
        self._leasing_on_plans = (data, line, plan, target)
        cast("asyncio.Future[Any]", taken).add_done_callback(self._leased_on_plans)
        return True

    def _leased_on_plans(self, pending: asyncio.Future[Any]) -> None:
        leasing, self._leasing_on_plans = self._leasing_on_plans, None
        assert leasing is not None
        data, line, plan, target = leasing
        ctx = self._ctx
        lease = ctx.taken(plan.request, pending)
        if lease is None:
            self._hand_over(data, None)  # the coroutine leases, and waits or answers
        elif self._client.closed or self._unowned():
            ctx.give_back_unused(lease)
            self._end(LaneEnd.CLOSE)
        elif ctx.draining:
            self._hand_over(data, lease)
        else:
            self._send_on_plans(data, line, plan, target, lease)

    def _hand_over(self, data: bytes, lease: Lease | None) -> None:
        """The coroutine carries this request (planned, so it parses), with `lease` if any."""
        self._parser_at_rest = False
        self._held.extend(self._parser.feed(data))
        self._ahead = lease
        self._end(LaneEnd.HANDOVER)

    def _send_on_plans(
        self,
        data: bytes,
        line: _Line,
        plan: RequestPlan,
        target: Target,
        lease: Lease,
    ) -> None:
        ctx = self._ctx
        if lease.rebound_from is not None and lease.uses == 1:
            # A session's first request after it moved: the answer names the upstream it
            # left, which the general exchange adds.
            self._hand_over(data, lease)
            return
        kept = ctx.connections.borrow(lease.upstream, target.host, target.port)
        if kept is None:
            self._hand_over(data, lease)  # a new connection to dial: the coroutine's work
            return
        ctx.begin_use(plan.pool)
        forward = kept.mode is DialMode.FORWARD
        line_end, method_end, authority_end = line
        if forward:
            start = data[: line_end + 2]  # absolute-form, HTTP/1.1: the line as it came
        else:
            path = data[authority_end : line_end - 9] or b"/"  # before " HTTP/1.1"
            if path[0] != 0x2F:  # "/": a bare "?query" gets one
                path = b"/" + path
            start = data[:method_end] + b" " + path + b" HTTP/1.1\r\n"
        upstream = kept.channel
        tail = ctx.express.tail(lease.upstream, forward)
        upstream.write(b"".join((start, plan.fields, target.host_field, tail)))
        self._carrying = (data, plan, target, Leased(lease, kept))
        loop = upstream.loop
        self._sent_at = now = loop.time()
        if self._watch is None:
            self._watch = loop.call_at(now + self._watch_step, self._check_time)
        gone = self._on_side_gone
        upstream.set_sink(self._on_response_bytes, on_eof=gone, on_lost=gone)
        self._client.set_sink(self._on_request_bytes, on_eof=gone, on_lost=gone)

    def _response_bytes(self, data: bytes) -> None:
        end = data.find(_HEAD_END)
        plan: ResponsePlan | None = None
        if end >= 0:
            express = self._ctx.express
            head = data[: end + 4]
            responses = express.responses
            plan = responses[head] if head in responses else express.plan_response(head)
        if plan is None or len(data) - end - 4 != plan.length:
            # Not a whole plain answer in one read: the general exchange takes it from here.
            self._take_over(data)
            return
        carrying, self._carrying = self._carrying, None
        assert carrying is not None
        _, request, target, leased = carrying
        ctx, client = self._ctx, self._client
        head = plan.head if request.keep_alive else plan.closing_head
        if not plan.length:
            client.write(head)
        elif len(data) < _JOIN_BELOW:
            client.write(head + data[end + 4 :])
        else:
            client.write_all((head, memoryview(data)[end + 4 :]))
        lease, dialed = leased.lease, leased.dialed
        upstream = dialed.channel
        if plan.keep_alive and not upstream.eof:
            ctx.connections.keep(lease.upstream, target.host, target.port, dialed)
        else:
            upstream.set_sink(None)
            upstream.close()
        ctx.give_back(lease)
        if ctx.draining or not request.keep_alive:
            self._end(LaneEnd.CLOSE)
        else:
            self._listen()

    def _client_spoke(self, data: bytes) -> None:
        """The client sent more while its request is in flight (pipelining)."""
        self._client.buffer += data
        self._take_over()

    def _side_gone(self, exc: BaseException | None = None) -> None:
        self._take_over()

    def _take_over(self, upstream_data: bytes = b"") -> Exchange:
        """Hand the request carried on plans to a general exchange, which goes on from where
        it stands: its head went up, nothing came down yet (`upstream_data` aside)."""
        self._parser_at_rest = False
        carrying, self._carrying = self._carrying, None
        assert carrying is not None
        data, plan, _, leased = carrying
        if upstream_data:
            leased.dialed.channel.buffer += upstream_data
        head = self._parser.feed(data)[0]  # planned, so it parses: a head and its end
        assert type(head) is RequestHead
        routed = plan.routed
        self._busy = (head, routed.fields, routed.route, leased)
        exchange = new_exchange(
            self._ctx, self._client, self._parser, self._held, head, leased, request_read=True
        )
        exchange.start(self._exchange_done)
        return exchange

    # -- a request in flight ------------------------------------------------------------------

    def _exchange_done(self, exchange: Exchange) -> None:
        busy, self._busy = self._busy, None
        assert busy is not None
        head, fields, route, leased = busy
        ctx = self._ctx
        end_attempt(ctx, head, leased, exchange)
        ctx.give_back(leased.lease)
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
