"""What every client connection shares: settings, the lease manager, and the steps common to
all protocols (authenticate, route, check the destination, lease and dial with retries)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, NamedTuple

from config import GatewaySettings, HttpUpstreamMode, Users
from core.errors import (
    CoreError,
    NoUpstreamAvailable,
    PoolNotFound,
    SessionFailed,
    StorageUnavailable,
)
from core.filters import Filter
from core.leasing import LeaseManager
from core.models import Lease, LeaseRequest, Outcome, Pool, StickyFailure
from gateway.channel import Channel
from gateway.dial import DialPolicy, dial
from gateway.dialed import Dialed
from gateway.errors import (
    AuthRequired,
    BadRequest,
    GatewayError,
    LoopDetected,
    NoUpstream,
    SessionLost,
    StorageDown,
    UnknownPool,
    UpstreamError,
)
from gateway.express import ExpressPlans
from gateway.protocols import (
    BadCredentials,
    ForwardHeaders,
    Headers,
    HttpProtocolError,
    parse_basic_auth,
    split_proxy_headers,
)
from gateway.relay import RelayResult, relay
from gateway.retry_budget import RetryBudget
from gateway.routing import Route, UsernameParams, choose_route, parse_username
from gateway.upstream_connections import KeepAliveLimits, UpstreamConnections

__all__ = ["GatewayContext", "Leased", "Routed"]

log = logging.getLogger("proxygate.gateway")

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True, init=False)
class Leased:
    """An upstream leased and dialed for one request or tunnel."""

    lease: Lease
    dialed: Dialed

    # Written out: compiled, a dataclass's generated __init__ runs interpreted.
    def __init__(self, lease: Lease, dialed: Dialed) -> None:
        self.lease = lease
        self.dialed = dialed


class Routed(NamedTuple):
    """Where an HTTP request goes, decided from its header fields."""

    fields: ForwardHeaders
    route: Route
    #: What `take_now` asks for (the first attempt's request).
    lease_request: LeaseRequest


@dataclass(slots=True)
class GatewayContext:
    settings: GatewaySettings
    manager: LeaseManager
    #: Addresses the gateway itself listens on (listeners and admin, as bound, wildcards
    #: included): a request for one of them would loop back into the gateway.
    own_addresses: frozenset[tuple[str, int]] = frozenset()
    policy: DialPolicy = field(init=False)
    via: bytes = field(init=False)
    retry_budget: RetryBudget = field(init=False)
    #: Kept connections to upstreams, lent to the next plain HTTP request.
    connections: UpstreamConnections = field(init=False)
    #: What everyday plain requests and their answers become, decided once each.
    express: ExpressPlans = field(init=False)
    _allowed_destinations: set[tuple[str, int, bool]] = field(default_factory=set)
    #: Set when the gateway stops: keep-alive connections take no further requests.
    draining: bool = False
    #: Client connections waiting between requests, closed at once when draining begins.
    idle_clients: set[Channel] = field(default_factory=set)
    #: Routing decided before, by listener pool and header fields (see `route`).
    _routes: dict[tuple[str | None, Headers], Routed] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.policy = DialPolicy(
            deny=tuple(self.settings.deny_destinations),
            allowed_ports=frozenset(self.settings.connect_ports),
            own_addresses=self.own_addresses,
        )
        self.via = f"1.1 {self.manager.instance_id} (proxygate)".encode()
        self.retry_budget = RetryBudget(
            self.settings.retry_budget_percent, self.settings.retry_budget_min
        )
        settings = self.settings
        self.connections = UpstreamConnections(
            KeepAliveLimits(
                max_idle=min(settings.keepalive_max_idle, settings.keepalive_max_idle_total),
                max_idle_total=settings.keepalive_max_idle_total,
                idle_timeout=settings.keepalive_idle_timeout,
                max_uses=settings.keepalive_max_uses,
            ),
            http_tunnels=settings.http_upstream_mode is HttpUpstreamMode.CONNECT,
        )
        self.express = ExpressPlans(self.route, self._check_plain_destination, self.via)

    def stats(self) -> dict[str, object]:
        """This process's own figures, for the admin API."""
        budget = self.retry_budget
        return {
            "tasks": len(asyncio.all_tasks()),
            "upstream_connections": asdict(self.connections.stats),
            "retry_budget": {"peak": budget.peak, "denied": budget.denied},
        }

    def begin_drain(self) -> None:
        self.draining = True
        for client in list(self.idle_clients):
            client.close()
        self.connections.close()

    @property
    def users(self) -> Users:
        return self.settings.users

    @property
    def auth_required(self) -> bool:
        return len(self.settings.users) > 0

    def authenticate(self, username: str | None, password: str | None) -> UsernameParams | None:
        """Check gateway credentials; return the username's routing parameters.

        Without configured users, credentials are optional and only route. The password
        belongs to the account; the username may carry parameters after it.
        """
        if username is None:
            if self.auth_required:
                raise AuthRequired("proxy authentication required")
            return None
        params = parse_username(username)
        if self.auth_required and not self.users.verify(params.account, password or ""):
            raise AuthRequired("proxy authentication failed")
        return params

    def route(self, headers: Headers, listener_pool: str | None) -> Routed:
        """The fields to forward and where an HTTP request with `headers` goes: gateway
        credentials checked, routing headers and username parameters applied, loops refused.

        Decided once per distinct set of fields: clients send the same ones over and over,
        and they alone decide (users and pools do not change while the gateway runs)."""
        key = (listener_pool, headers)
        routed = self._routes.get(key)
        if routed is None:
            routed = self._route(headers, listener_pool)
            if len(self._routes) >= _ROUTES_KEPT:
                self._routes.clear()
            self._routes[key] = routed
        return routed

    def _route(self, headers: Headers, listener_pool: str | None) -> Routed:
        try:
            fields = split_proxy_headers(headers)
        except HttpProtocolError as exc:
            raise BadRequest(str(exc), status=exc.status) from None
        username = password = None
        if fields.proxy_authorization is not None:
            try:
                username, password = parse_basic_auth(fields.proxy_authorization)
            except BadCredentials:
                raise AuthRequired("malformed proxy credentials") from None
        params = self.authenticate(username, password)
        route = choose_route(
            header_pool=fields.pool,
            header_session=fields.session,
            header_country=fields.country,
            username=params,
            listener_pool=listener_pool,
            default_pool=self.settings.default_pool,
        )
        self.check_via(fields.via)
        return Routed(fields, route, _lease_request(route, set()))

    def check_destination(self, host: str, port: int, *, tunnel: bool) -> None:
        """Refuse loops and policy-denied destinations: literal IPs here, names only after
        resolution and only for direct dials (in `gateway.dial`): the gateway never resolves
        a name that an upstream will resolve."""
        key = (host, port, tunnel)
        if key in self._allowed_destinations:
            return  # decided before: parsing an address per request is costly
        address = _ip_literal(host)
        if address is None and host.lower() == "localhost":
            address = _LOCALHOST
        if address is None:
            refused: GatewayError | None = self.policy.port_refusal(port, tunnel=tunnel)
        else:
            refused = self.policy.refusal(address, port, tunnel=tunnel)
        if refused is not None:
            raise refused
        if len(self._allowed_destinations) >= _ALLOWED_DESTINATIONS_KEPT:
            self._allowed_destinations.clear()
        self._allowed_destinations.add(key)

    def _check_plain_destination(self, host: str, port: int) -> None:
        self.check_destination(host, port, tunnel=False)

    def check_via(self, via_values: tuple[bytes, ...]) -> None:
        """A request that already passed through this gateway is a loop."""
        marker = self.via[4:]
        for value in via_values:
            if marker in value:
                raise LoopDetected("the request already passed through this gateway")

    async def lease_and_dial(
        self,
        route: Route,
        host: str,
        port: int,
        *,
        tunnel: bool,
        avoid: frozenset[str] = frozenset(),
        reuse: bool = False,
        lease: Lease | None = None,
    ) -> Leased:
        """Lease an upstream (none of `avoid`) and reach host:port through it, trying other
        upstreams of the pool while attempts fail before any request byte was sent and the
        pool's retry budget allows. With `reuse` (plain HTTP requests only) a kept connection
        to the leased upstream is lent when there is one. `lease`, taken for this request
        already (`take_now`), serves the first attempt. Every success must be followed by
        `give_back`."""
        budget = self.retry_budget
        budget.request_started(route.pool)
        try:
            return await self._attempts(route, host, port, tunnel, set(avoid), reuse, lease)
        except BaseException:
            budget.request_ended(route.pool)
            raise

    async def _attempts(
        self,
        route: Route,
        host: str,
        port: int,
        tunnel: bool,
        tried: set[str],
        reuse: bool,
        lease: Lease | None,
    ) -> Leased:
        budget = self.retry_budget
        last_error: UpstreamError | None = None
        retries = 0  # known once an attempt failed: most requests never need the pool's record
        attempt = 0
        while True:
            if last_error is not None and not budget.try_retry(route.pool):
                log.info("pool %s: retry budget spent, not retrying", route.pool)
                raise last_error
            try:
                taken, lease = lease, None
                return await self._attempt(route, host, port, tunnel, tried, reuse, taken)
            except NoUpstream:
                if last_error is not None:
                    raise last_error from None  # every upstream left has been tried
                raise
            except UpstreamError as exc:
                if not exc.retryable:
                    raise
                last_error = exc
            finally:
                if attempt:
                    budget.retry_ended(route.pool)
            # After the handler, not in it: compiled code must not await inside one (see
            # tests/test_compiled.py).
            if attempt == 0:
                retries = (await self._pool(route.pool)).retries
            attempt += 1
            if attempt > retries:
                raise last_error

    async def _pool(self, name: str) -> Pool:
        try:
            return await self.manager.pool(name)
        except PoolNotFound:
            raise UnknownPool(name) from None
        except StorageUnavailable:
            raise StorageDown() from None

    async def _attempt(
        self,
        route: Route,
        host: str,
        port: int,
        tunnel: bool,
        tried: set[str],
        reuse: bool,
        lease: Lease | None,
    ) -> Leased:
        """One lease (unless taken already) and dial; a failed dial's upstream joins
        `tried`."""
        manager = self.manager
        if lease is None:
            lease = await self._acquire(route, tried)
        # Giving back (give_back, report) never fails for want of storage: the lease manager
        # keeps what the storage cannot take yet until it answers again.
        if reuse:
            kept = self.connections.borrow(lease.upstream, host, port)
            if kept is not None:
                return Leased(lease, kept)
            self.connections.count_miss()
        try:
            dialed = await dial(
                lease.upstream,
                host,
                port,
                tunnel=tunnel or self.connections.via_connect(lease.upstream),
                connect_timeout=self.settings.connect_timeout,
                policy=self.policy,
                via=self.via,
            )
        except BaseException as exc:
            failure = exc
        else:
            # The request goes on at once: a success changes no routing decision of its own.
            await manager.report_soon(lease.upstream.id, Outcome.OK, dialed.connect_latency)
            return Leased(lease, dialed)
        # What a failed dial leaves is settled after the handler, not in it: compiled code must
        # not await inside one (see tests/test_compiled.py).
        raise await self._dial_failed(route, lease, tried, failure)

    async def _dial_failed(
        self, route: Route, lease: Lease, tried: set[str], failure: BaseException
    ) -> BaseException:
        """Give back the lease of a failed dial and report the failure; what to raise: the
        dial's error (not retryable once it failed its session for good), or what went wrong
        while moving the session."""
        manager = self.manager
        if not isinstance(failure, UpstreamError):
            manager.give_back(lease)
            return failure
        upstream_id = lease.upstream.id
        tried.add(upstream_id)
        try:
            session_failed = await self._leave_upstream(route, lease, failure.outcome)
        except BaseException as exc:
            moving = exc
        else:
            manager.give_back(lease)
            await manager.report(upstream_id, failure.outcome, None)
            outcome = failure.outcome.value
            log.info("attempt via %s failed: %s (%s)", upstream_id, outcome, failure.details)
            if session_failed:
                failure.retryable = False
            return failure
        manager.give_back(lease)
        return moving

    async def _leave_upstream(self, route: Route, lease: Lease, outcome: Outcome) -> bool:
        """A session's lease whose upstream failed: the session leaves it, bound anew on the
        retry or failed for good (True), as its pool says."""
        if lease.session is None or not outcome.counts_against_upstream:
            return False
        try:
            pool = await self.manager.pool(route.pool)
            session_failed = pool.on_sticky_failure is StickyFailure.FAIL
            await self.manager.unbind_session(lease, fail=session_failed)
        except StorageUnavailable:
            # The session stays on the failed upstream for now; the dial's failure is still
            # the answer.
            log.info("session of lease %s not moved: the storage is unavailable", lease.id)
            return False
        return session_failed

    async def _acquire(self, route: Route, tried: set[str]) -> Lease:
        request = _lease_request(route, tried)
        try:
            return await self.manager.acquire(request, self.settings.acquire_timeout)
        except PoolNotFound:
            raise UnknownPool(route.pool) from None
        except NoUpstreamAvailable as exc:
            raise NoUpstream(exc.reason) from None
        except SessionFailed as exc:
            raise SessionLost(exc.upstream_id) from None
        except StorageUnavailable:
            raise StorageDown() from None

    async def tunnel(
        self,
        client: Channel,
        route: Route,
        host: str,
        port: int,
        *,
        established: bytes | Callable[[Lease], bytes],
        client_early: bytes,
    ) -> None:
        """Lease, dial, answer `established` (or what it makes of the lease), then relay until
        the tunnel ends. The client hears success only once the upstream tunnel is up."""
        self.check_destination(host, port, tunnel=True)
        leased = await self.lease_and_dial(route, host, port, tunnel=True)
        failure: BaseException | None = None
        ended: RelayResult | None = None
        try:
            if not isinstance(established, bytes):
                established = established(leased.lease)
            client.write(established)
            ended = await relay(
                client,
                leased.dialed.channel,
                idle_timeout=self.settings.idle_timeout,
                client_early=client_early,
                upstream_early=leased.dialed.early,
            )
        except BaseException as exc:
            failure = exc
        leased.dialed.channel.close()
        self.give_back(leased.lease)
        if failure is not None:
            raise failure
        if ended is not None and ended.upstream_broke:
            # Its dial was reported a success already; the tunnel's end says otherwise.
            await self.manager.report_soon(leased.lease.upstream.id, Outcome.RESET, None)

    def take_now(self, request: LeaseRequest) -> Lease | asyncio.Future[Any] | None:
        """For a plain HTTP request: a lease got without awaiting; a future bringing one,
        read with `taken` once done (which must be called); or None when leasing needs the
        awaited path (`lease_and_dial`: waiting in line, or answering what went wrong). A
        lease got here is handed to `lease_and_dial` (`lease=`), or given back with
        `give_back` once `begin_use` counted it (`give_back_unused` if not)."""
        try:
            return self.manager.take_now(request)
        except CoreError:
            return None  # lease_and_dial meets it again, and answers it

    def taken(self, request: LeaseRequest, pending: asyncio.Future[Any]) -> Lease | None:
        """The lease a `take_now` future brought, or None: `lease_and_dial` then leases,
        waits in line or answers what went wrong."""
        try:
            return self.manager.taken(request, pending)
        except (Exception, asyncio.CancelledError):
            return None  # lease_and_dial meets it again, and answers it

    def begin_use(self, pool: str) -> None:
        """A request started using a lease from `take_now` itself (`lease_and_dial` counts
        its own)."""
        self.retry_budget.request_started(pool)

    def give_back(self, lease: Lease) -> None:
        """End a request's use of its lease (a session's lease stays bound to it)."""
        self.retry_budget.request_ended(lease.pool)
        self.manager.give_back(lease)

    def give_back_unused(self, lease: Lease) -> None:
        """Give back a lease no request used (`begin_use` not called)."""
        self.manager.give_back(lease)


def _lease_request(route: Route, tried: set[str]) -> LeaseRequest:
    return LeaseRequest(
        route.pool,
        consumer=route.consumer,
        session=route.session,
        filters=_filters(route.country, tried),
        session_ttl=route.session_ttl,
    )


def _filters(country: str | None, tried: set[str]) -> Filter | None:
    if not tried:
        return None if country is None else Filter(country=country)
    excluded = frozenset(tried)
    return Filter(country=country, predicate=lambda upstream: upstream.id not in excluded)


_ROUTES_KEPT: Final = 1024
_LOCALHOST: Final = ipaddress.ip_address("127.0.0.1")
_ALLOWED_DESTINATIONS_KEPT: Final = 4096
_NOT_IN_IP_LITERALS: Final = frozenset("ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ-_")


def _ip_literal(host: str) -> _IPAddress | None:
    if not host or not _NOT_IN_IP_LITERALS.isdisjoint(host):
        return None  # a name: skip the two exceptions ip_address() would raise
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
