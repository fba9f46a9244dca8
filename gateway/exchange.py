"""One plain HTTP request and its response, carried between two channels.

The request head has been parsed and sent; from then on everything happens in the channels'
`data_received`: request body pieces are re-framed into the upstream, response events are
re-framed back to the client, and the owner either sleeps on one future until the exchange ends
(`run`) or is called back then (`start`). Pipelined requests that arrive meanwhile are parsed
and held for later.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from enum import StrEnum

from core.models import Outcome
from gateway.channel import Channel
from gateway.protocols import (
    LAST_CHUNK,
    BodyData,
    HttpProtocolError,
    RequestEnd,
    RequestEvent,
    RequestParser,
    ResponseEnd,
    ResponseHead,
    ResponseParser,
    encode_chunk,
    serialize_response_head,
)
from gateway.protocols.http1 import REASON_PHRASES

__all__ = ["Exchange", "ExchangeEnd", "response_headers"]

# Response fields that describe one hop, never forwarded (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


class ExchangeEnd(StrEnum):
    DONE = "done"  # response delivered; the client connection may carry on
    UPSTREAM_AUTH = "upstream_auth"  # the upstream proxy refused our credentials (nothing sent on)
    UPSTREAM_FAILED = "upstream_failed"  # upstream broke before a response head reached the client
    ABORTED = "aborted"  # broke after the response started, or the client went away


def response_headers(head: ResponseHead, via: bytes) -> list[tuple[bytes, bytes]]:
    """The response head's fields as forwarded: hop-by-hop ones (and those named in
    Connection) dropped, our Via added."""
    kept: list[tuple[bytes, bytes]] = []
    named: set[bytes] = set()
    for name, value in head.headers:
        lower = name.lower()
        if lower not in _HOP_BY_HOP:
            kept.append((name, value))
        elif lower == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    named -= _HOP_BY_HOP
    if named:
        kept = [pair for pair in kept if pair[0].lower() not in named]
    kept.append((b"Via", via))
    return kept


class Exchange:
    __slots__ = (
        "_chunked_request",
        "_client",
        "_client_keep_alive",
        "_client_version",
        "_extra_headers",
        "_finished",
        "_forward_auth_check",
        "_held",
        "_idle_timeout",
        "_idle_timer",
        "_last_progress",
        "_method",
        "_on_done",
        "_quiet_checks",
        "_rechunk_response",
        "_request_done",
        "_request_parser",
        "_response_parser",
        "_response_timeout",
        "_response_timer",
        "_upstream",
        "_upstream_keep_alive",
        "_via",
        "_waiter",
        "bytes_down",
        "bytes_up",
        "end",
        "got_response",
        "keep_alive",
        "outcome",
        "overdue",
        "response_started",
    )

    def __init__(
        self,
        *,
        client: Channel,
        upstream: Channel,
        request_parser: RequestParser,
        held: deque[RequestEvent],
        method: str,
        chunked_request: bool,
        client_keep_alive: bool,
        client_version: str,
        via: bytes,
        idle_timeout: float,
        response_timeout: float,
        upstream_is_proxy: bool,
        request_done: bool = False,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._request_parser = request_parser
        self._held = held
        self._method = method
        self._response_parser = ResponseParser(method)
        self._chunked_request = chunked_request
        self._client_keep_alive = client_keep_alive
        self._client_version = client_version
        self._via = via
        self._idle_timeout = idle_timeout
        self._forward_auth_check = upstream_is_proxy
        self._request_done = request_done
        self._extra_headers = extra_headers
        self._rechunk_response = False
        self._finished = False
        self._waiter: asyncio.Future[None] | None = None
        self._on_done: Callable[[Exchange], None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._response_timeout = response_timeout
        self._response_timer: asyncio.TimerHandle | None = None
        self._upstream_keep_alive = False
        self._last_progress = -1
        self._quiet_checks = 0
        self.end = ExchangeEnd.DONE
        self.outcome = Outcome.OK
        self.response_started = False
        self.keep_alive = client_keep_alive
        self.bytes_up = 0
        self.bytes_down = 0
        self.got_response = False
        #: No byte of an answer came within `response_timeout` of the request's end.
        self.overdue = False

    async def run(self) -> ExchangeEnd:
        """Carry the request body and the response; return how it ended."""
        try:
            self.start()
            if not self._finished:
                self._waiter = self._client.loop.create_future()
                await self._waiter
        finally:
            self._detach()
        return self.end

    def start(self, on_done: Callable[[Exchange], None] | None = None) -> None:
        """Take over both channels' callbacks; `on_done` is called once the exchange ended
        (`end`) and let go of them. Bytes the channels buffered meanwhile are handled first."""
        self._on_done = on_done
        client, upstream = self._client, self._upstream
        upstream.set_sink(self._from_upstream, on_eof=self._upstream_eof, on_lost=self._lost)
        client.set_sink(self._from_client, on_eof=self._client_eof, on_lost=self._lost)
        upstream.on_write_pressure(client.pause_reading, client.resume_reading)
        client.on_write_pressure(upstream.pause_reading, upstream.resume_reading)
        # Body pieces parsed together with the head, then bytes read but not yet parsed.
        while self._held and not self._request_done:
            self._on_request_event(self._held.popleft())
        if self._request_done:
            self._await_response()
        else:
            self._watch_idle()  # a body to carry; until it ends, only progress tells
        if client.buffer and not self._finished:
            self._from_client(client.take_buffer())
        if client.eof and not self._finished:
            self._client_eof()  # left while the upstream was being dialed
        if upstream.buffer and not self._finished:
            self._from_upstream(upstream.take_buffer())
        if upstream.eof and not self._finished:
            self._upstream_eof()

    # -- client side --------------------------------------------------------------------------

    def _from_client(self, data: bytes) -> None:
        try:
            events = self._request_parser.feed(data)
        except HttpProtocolError:
            # A malformed body (or pipelined request): nothing sane can follow on either side.
            self._finish(ExchangeEnd.ABORTED)
            return
        for event in events:
            if self._request_done:
                # A pipelined request: hold it, and stop reading until this exchange is over.
                self._held.append(event)
                self._client.pause_reading()
            else:
                self._on_request_event(event)

    def _on_request_event(self, event: RequestEvent) -> None:
        if isinstance(event, BodyData):
            self.bytes_up += len(event.data)
            self._upstream.write(encode_chunk(event.data) if self._chunked_request else event.data)
        elif isinstance(event, RequestEnd):
            self._request_done = True
            if self._chunked_request:
                self._upstream.write(LAST_CHUNK)
            self._await_response()
        else:  # pragma: no cover - a head cannot come before this request's end
            self._held.append(event)

    def _client_eof(self) -> None:
        # HTTP clients do not half-close; an EOF means the client left. Ending the exchange
        # now frees the lease instead of holding it until a slow origin answers nobody.
        self._finish(ExchangeEnd.ABORTED)

    # -- upstream side ------------------------------------------------------------------------

    def _await_response(self) -> None:
        # Until the first byte this one timer also stands for `idle_timeout`, when shorter.
        if not self.got_response and self._response_timer is None:
            self._response_timer = self._client.loop.call_later(
                min(self._response_timeout, self._idle_timeout), self._response_overdue
            )

    def expire(self) -> None:
        """The response's time ran out before this exchange started (its timer was kept by
        whoever carried the request so far): end now as if its own timer had fired."""
        if self._response_timer is not None:
            self._response_timer.cancel()
            self._response_timer = None
        self._response_overdue()

    def _response_overdue(self) -> None:
        self._response_timer = None
        if not self.got_response:
            self.overdue = self._response_timeout <= self._idle_timeout
            self._upstream_broke(Outcome.READ_TIMEOUT)

    def _from_upstream(self, data: bytes) -> None:
        if not self.got_response:
            self.got_response = True
            if self._response_timer is not None:
                self._response_timer.cancel()
                self._response_timer = None
            self._feed_response(data)
            if not self._finished:
                self._watch_idle()  # a response longer than one read: watch it progress
            return
        self._feed_response(data)

    def _feed_response(self, data: bytes) -> None:
        try:
            events = self._response_parser.feed(data)
        except HttpProtocolError:
            self._upstream_broke(Outcome.PROXY_ERROR)
            return
        # What these events send the client goes out in one write: a small response's head,
        # body and end usually arrive together, and each write is a system call.
        out: list[bytes] = []
        for event in events:
            if self._finished:
                break  # e.g. the body of an upstream's 407: not the client's
            if isinstance(event, BodyData):
                self.bytes_down += len(event.data)
                out.append(encode_chunk(event.data) if self._rechunk_response else event.data)
            elif isinstance(event, ResponseHead):
                if not self._on_response_head(event, out):
                    break
            else:
                assert isinstance(event, ResponseEnd)
                if self._rechunk_response:
                    out.append(LAST_CHUNK)
                self._client.write_all(out)
                self._finish(ExchangeEnd.DONE)
                return
        if out:
            self._client.write_all(out)

    def _on_response_head(self, head: ResponseHead, out: list[bytes]) -> bool:
        if head.status == 407 and self._forward_auth_check:
            # The upstream proxy rejected our credentials: its 407 is not the client's business.
            self.outcome = Outcome.PROXY_AUTH_FAILED
            self._finish(ExchangeEnd.UPSTREAM_AUTH)
            return False
        if head.status == 101:
            # We strip Upgrade from requests: an upstream switching protocols is broken.
            self._upstream_broke(Outcome.PROXY_ERROR)
            return False
        interim = 100 <= head.status < 200
        if interim and self._client_version == "1.0":
            return True  # RFC 9110 15.2: no 1xx to an HTTP/1.0 client
        headers = response_headers(head, self._via)
        if not interim:
            self._upstream_keep_alive = head.keep_alive
            headers.extend(self._extra_headers)
            self.response_started = True
            if head.status >= 500:
                self.outcome = Outcome.TARGET_ERROR
            self._frame_response(head, headers)
        out.append(
            serialize_response_head(
                head.status, head.reason or REASON_PHRASES.get(head.status, ""), headers
            )
        )
        return True

    def _frame_response(self, head: ResponseHead, headers: list[tuple[bytes, bytes]]) -> None:
        """Choose how the body reaches the client, and whether the connection can stay."""
        if self._response_has_body(head) and (head.chunked or head.content_length is None):
            if self._client_version == "1.1":
                self._rechunk_response = True
                headers.append((b"Transfer-Encoding", b"chunked"))
            else:
                self.keep_alive = False  # HTTP/1.0 client: the body ends when we close
        if not self.keep_alive:
            headers.append((b"Connection", b"close"))
        elif self._client_version == "1.0":
            headers.append((b"Connection", b"keep-alive"))

    def _response_has_body(self, head: ResponseHead) -> bool:
        return not (head.status in (204, 304) or head.status < 200 or self._method == "HEAD")

    def _upstream_eof(self) -> None:
        try:
            events = self._response_parser.feed_eof()
        except HttpProtocolError:
            self._upstream_broke(Outcome.RESET)
            return
        for event in events:
            if isinstance(event, ResponseEnd):
                if self._rechunk_response:
                    self._client.write(LAST_CHUNK)
                self._finish(ExchangeEnd.DONE)
                return
        self._upstream_broke(Outcome.RESET)

    def _upstream_broke(self, outcome: Outcome) -> None:
        self.outcome = outcome
        if self.response_started:
            self._finish(ExchangeEnd.ABORTED)
        else:
            self._finish(ExchangeEnd.UPSTREAM_FAILED)

    def _lost(self, exc: BaseException | None) -> None:
        if self._finished:
            return
        if self._upstream.closed and not self._client.closed:
            self._upstream_broke(Outcome.RESET)
        else:
            self._finish(ExchangeEnd.ABORTED)

    # -- common -------------------------------------------------------------------------------

    def _watch_idle(self) -> None:
        """From now on, `idle_timeout` without a byte either way ends the exchange (checked a
        quarter of it at a time: one timer, not one per chunk)."""
        if self._idle_timer is None:
            self._idle_timer = self._client.loop.call_later(
                self._idle_timeout / 4, self._check_idle
            )

    def _check_idle(self) -> None:
        progress = self.bytes_up + self.bytes_down + self.got_response
        if progress != self._last_progress:
            self._last_progress = progress
            self._quiet_checks = 0
        else:
            self._quiet_checks += 1
            if self._quiet_checks >= 4:
                self._upstream_broke(Outcome.READ_TIMEOUT)
                return
        self._idle_timer = self._client.loop.call_later(self._idle_timeout / 4, self._check_idle)

    def _finish(self, end: ExchangeEnd) -> None:
        if self._finished:
            return
        self._finished = True
        self.end = end
        if end is not ExchangeEnd.DONE:
            self.keep_alive = False
            if end is ExchangeEnd.ABORTED and self.response_started:
                self._client.reset()  # a cut-off body must not look complete
        if self._waiter is not None:
            self._waiter.set_result(None)
        elif self._on_done is not None:
            self._detach()
            self._on_done(self)

    @property
    def upstream_reusable(self) -> bool:
        """The upstream connection could carry another request: this exchange ended in full
        on both sides, the upstream said keep-alive, and sent nothing after its answer."""
        return (
            self.end is ExchangeEnd.DONE
            and self._request_done
            and self._upstream_keep_alive
            and self._response_parser.ended_cleanly
            and not self._upstream.eof
        )

    @property
    def upstream_ended(self) -> bool:
        """This exchange ended in full and its upstream ended the connection: it said close
        (or spoke HTTP/1.0), or closed after its answer."""
        return self.end is ExchangeEnd.DONE and (
            not self._upstream_keep_alive or self._upstream.eof
        )

    def _detach(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._response_timer is not None:
            self._response_timer.cancel()
        for side in (self._client, self._upstream):
            side.set_sink(None)
            side.on_write_pressure(None, None)
        self._client.resume_reading()
