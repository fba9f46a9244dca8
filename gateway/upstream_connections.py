"""Keep-alive connections to upstreams, kept between plain HTTP requests for the next one.

Rotation stays per request: the lease is taken as always, and only the connection to the
leased upstream is reused. A connection to an HTTP proxy that is sent requests in absolute form
carries requests for any target, so it is kept per upstream; through any other upstream (SOCKS,
direct, or an HTTP proxy reached through CONNECT tunnels, `HttpUpstreamMode.CONNECT`) a
connection reaches one target, so it is kept per upstream and target.

The recycling rules of an object pool:

- *max uses*: a connection that carried `max_uses` requests is closed instead of kept, so
  long-lived connections cannot pin an upstream's per-connection state forever;
- *idle expiry*: one kept longer than `idle_timeout` is closed (upstreams close idle
  connections too, and reusing one they are closing costs a retry);
- *health on borrow*: a connection the upstream closed, or that received bytes while idle (an
  upstream speaking out of turn), is never lent; one closed while idle is dropped at once;
- *bounds*: at most `max_idle` per key and `max_idle_total` in all, the oldest going first
  when a newer one is kept.

Connections are lent most recently used first: the warmest is the least likely to be closing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

from core.endpoints import Scheme
from core.models import Upstream
from gateway.channel import Channel
from gateway.dialed import Dialed

__all__ = ["ConnectionStats", "KeepAliveLimits", "UpstreamConnections"]

#: An upstream's id for connections that carry requests for any target, (id, host, port) for
#: those that reach one target.
_Key = str | tuple[str, str, int]

log = logging.getLogger("proxygate.connections")

#: Connections to HTTP upstreams (absolute form) that their upstream ended after one answer,
#: before the gateway says once that `http_upstream_mode = "connect"` suits such upstreams.
_HINT_AFTER: Final = 100
#: Seconds after its answer within which a kept connection's close counts as that: an idle
#: timeout closes connections much later, an upstream serving one request per connection at
#: once.
_CLOSED_AT_ONCE: Final = 1.0


@dataclass(frozen=True, slots=True)
class KeepAliveLimits:
    """The `gateway.keepalive_*` settings (their defaults live there)."""

    #: Idle connections kept per key; 0 turns reuse off (one connection per request).
    max_idle: int
    #: Idle connections kept in all, whatever their key.
    max_idle_total: int
    #: Seconds a connection may stay idle before it is closed.
    idle_timeout: float
    #: Requests one connection may carry before it is closed.
    max_uses: int


@dataclass(slots=True)
class ConnectionStats:
    idle: int = 0
    #: Requests that got a kept connection, and those that dialed a new one.
    reused: int = 0
    missed: int = 0
    #: Connections kept after a request, and those closed because of a rule above.
    kept: int = 0
    expired: int = 0
    retired: int = 0
    closed_by_upstream: int = 0
    evicted: int = 0


class _Idle:
    """A kept connection; its bound methods are the channel's callbacks while it waits."""

    __slots__ = ("channel", "dialed", "key", "owner", "since")

    def __init__(self, owner: UpstreamConnections, key: _Key, dialed: Dialed, since: float) -> None:
        self.owner = owner
        self.key = key
        #: Lent again as it is, its `uses` counted (one object per connection, not per loan).
        self.dialed = dialed
        self.channel = dialed.channel
        self.since = since

    def unsolicited(self, data: bytes) -> None:
        self.gone()

    def gone(self, exc: BaseException | None = None) -> None:
        self.owner._drop(self)


class UpstreamConnections:
    def __init__(self, limits: KeepAliveLimits, *, http_tunnels: bool = False) -> None:
        self.limits = limits
        #: Plain HTTP goes through HTTP proxies in CONNECT tunnels (`HttpUpstreamMode.CONNECT`).
        self.http_tunnels = http_tunnels
        self.stats = ConnectionStats()
        # Kept connections per key (most recent last), and all of them oldest first.
        self._idle: dict[_Key, list[_Idle]] = {}
        self._by_age: dict[_Idle, None] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._closed_after_one = 0

    @property
    def enabled(self) -> bool:
        return self.limits.max_idle > 0 and not self._closed

    def via_connect(self, upstream: Upstream) -> bool:
        """Whether plain HTTP requests go through `upstream`, an HTTP(S) proxy, in CONNECT
        tunnels to their targets (`http_tunnels`) rather than in absolute form."""
        return self.http_tunnels and upstream.endpoint.is_http_proxy

    def borrow(self, upstream: Upstream, host: str, port: int) -> Dialed | None:
        """A kept connection to `upstream` for a plain HTTP request to host:port (its `uses`
        say how many requests it already carried); None when there is none fit to use."""
        key = _key(upstream, host, port, self.http_tunnels)
        stack = self._idle.get(key)
        stats = self.stats
        if stack:
            # Not asyncio.get_running_loop(): it makes a system call (getpid) each time.
            deadline = stack[-1].channel.loop.time() - self.limits.idle_timeout
            while stack:
                entry = stack[-1]
                self._remove(entry)
                channel = entry.channel
                channel.set_sink(None)
                if channel.closed or channel.eof or channel.buffer:
                    stats.closed_by_upstream += 1
                    self._closed_while_kept(entry)
                    channel.close()
                elif entry.since < deadline:
                    stats.expired += 1
                    channel.close()
                else:
                    stats.reused += 1
                    return entry.dialed
        return None

    def closed_after_one(self, upstream_id: str) -> None:
        """An upstream sent requests in absolute form ended a connection after answering one:
        said once in the log when that keeps happening, with what serves such upstreams.
        Not counted while connections are not kept: the gateway asked for the close then."""
        if not self.enabled:
            return
        self._closed_after_one += 1
        if self._closed_after_one == _HINT_AFTER:
            log.info(
                "HTTP upstreams end their connections after one answer (%s among them): every "
                'request opens a new one; gateway.http_upstream_mode = "connect" keeps CONNECT '
                "tunnels through them instead",
                upstream_id,
            )

    def count_miss(self) -> None:
        """A request that could have reused a connection dials a new one: counted here, once,
        however many times it looked (the keep-alive lane looks before its coroutine does)."""
        self.stats.missed += 1

    def keep(self, upstream: Upstream, host: str, port: int, dialed: Dialed) -> None:
        """Take back a connection that carried one more request and is ready for another
        (its response ended and nothing followed it); closes it when a rule says so."""
        limits = self.limits
        channel = dialed.channel
        if not self.enabled or channel.closed or channel.eof or channel.buffer:
            _discard(channel)
            return
        dialed.uses += 1
        dialed.early = b""  # sent on with the first request
        if dialed.uses >= limits.max_uses:
            self.stats.retired += 1
            _discard(channel)
            return
        key = _key(upstream, host, port, self.http_tunnels)
        stack = self._idle.get(key)
        if stack is not None and len(stack) >= limits.max_idle:
            self._evict(stack[0])
            stack = self._idle.get(key)  # gone with its last entry
        if len(self._by_age) >= limits.max_idle_total:
            # Many upstreams, each reused seldom (a large pool in rotation): the connection
            # idle longest anywhere makes room, so kept ones never pile up without bound.
            self._evict(next(iter(self._by_age)))
            stack = self._idle.get(key)
        loop = channel.loop
        entry = _Idle(self, key, dialed, loop.time())
        channel.set_sink(entry.unsolicited, on_eof=entry.gone, on_lost=entry.gone)
        # Its last exchange may have paused it for a slow client: an idle connection must
        # hear its upstream close.
        channel.resume_reading()
        if stack is None:
            self._idle[key] = [entry]
        else:
            stack.append(entry)
        self._by_age[entry] = None
        self.stats.idle += 1
        self.stats.kept += 1
        if self._sweeper is None:
            self._sweeper = loop.call_later(limits.idle_timeout / 2, self._sweep)

    def close(self) -> None:
        """Close every kept connection and keep none from now on (the gateway is stopping)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for entry in list(self._by_age):
            self._remove(entry)
            _discard(entry.channel)

    def _drop(self, entry: _Idle) -> None:
        """The upstream closed a kept connection, or spoke while it was idle."""
        if entry in self._by_age:
            self._remove(entry)
            self.stats.closed_by_upstream += 1
            self._closed_while_kept(entry)
        _discard(entry.channel)

    def _closed_while_kept(self, entry: _Idle) -> None:
        key = entry.key
        # A key of its own for an upstream sent requests in absolute form: its id.
        if (
            isinstance(key, str)
            and entry.dialed.uses == 1
            and entry.channel.loop.time() - entry.since <= _CLOSED_AT_ONCE
        ):
            self.closed_after_one(key)

    def _evict(self, entry: _Idle) -> None:
        self._remove(entry)
        self.stats.evicted += 1
        _discard(entry.channel)

    def _remove(self, entry: _Idle) -> None:
        del self._by_age[entry]
        stack = self._idle[entry.key]
        if stack[-1] is entry:
            stack.pop()  # borrowing takes the warmest, on top: no search
        else:
            stack.remove(entry)
        if not stack:
            del self._idle[entry.key]
        self.stats.idle -= 1

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self.limits.idle_timeout
        while self._by_age:
            entry = next(iter(self._by_age))
            if entry.since >= deadline:
                break  # oldest first: the rest are younger
            self._remove(entry)
            self.stats.expired += 1
            _discard(entry.channel)
        if self._by_age:
            self._sweeper = loop.call_later(self.limits.idle_timeout / 2, self._sweep)


def _discard(channel: Channel) -> None:
    # Whoever carried the last request may still be the channel's sink: it hears no more.
    channel.set_sink(None)
    channel.close()


def _key(upstream: Upstream, host: str, port: int, http_tunnels: bool) -> _Key:
    # The id names the endpoint (and a string hashes once); the endpoint itself would be
    # hashed field by field on every request. The scheme is compared here, not through
    # `Endpoint.is_http_proxy`: this runs twice per request.
    scheme = upstream.endpoint.scheme
    if (scheme is Scheme.HTTP or scheme is Scheme.HTTPS) and not http_tunnels:
        return upstream.id
    return (upstream.id, host, port)
