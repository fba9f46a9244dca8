"""The settings the gateway runs on: frozen values, fully validated by `config.load`."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from core.endpoints import Endpoint
from core.models import HealthPolicy, Pool, Selector, StickyFailure, Upstream

__all__ = [
    "LOG_LEVELS",
    "AdminSettings",
    "CheckSettings",
    "GatewaySettings",
    "ListenAddress",
    "ListenerSettings",
    "PoolSettings",
    "Settings",
    "StorageSettings",
    "Users",
    "redact_url",
]

LOG_LEVELS = ("debug", "info", "warning", "error")

# The pool defaults live in core, so a pool configured without options leases exactly like one
# created through the core API.
_POOL_DEFAULTS = Pool(name="")


def redact_url(url: str) -> str:
    """`url` with the password of its userinfo replaced by `***`, for messages and logs.

    Works on text that is not a valid URL too: everything up to the last "@" after "://" is
    treated as userinfo, so a password holding "/" or "@" is still hidden.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, location = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if "/" in user:
        user, colon = "***", ""
    return f"{scheme}://{user}{':***' if colon else ''}@{location}"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A local address to bind: `host` is an IP literal without brackets; port 0 is any port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        address = ipaddress.ip_address(self.host)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback

    @property
    def is_unspecified(self) -> bool:
        """0.0.0.0 or ::, which bind every address of their family."""
        return ipaddress.ip_address(self.host).is_unspecified


class Users(Mapping[str, str]):
    """Gateway accounts, name to password: read-only, and its repr shows the names only."""

    __slots__ = ("_passwords",)

    def __init__(self, passwords: Mapping[str, str] | None = None) -> None:
        self._passwords = dict(passwords or {})

    def __getitem__(self, name: str) -> str:
        return self._passwords[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._passwords)

    def __len__(self) -> int:
        return len(self._passwords)

    def __hash__(self) -> int:
        return hash(frozenset(self._passwords.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Users):
            return self._passwords == other._passwords
        return NotImplemented

    def __repr__(self) -> str:
        return f"Users({sorted(self._passwords)!r})"

    def verify(self, name: str, password: str) -> bool:
        """Whether `password` is `name`'s, compared in constant time (no timing oracle)."""
        expected = self._passwords.get(name)
        # An unknown name still pays for a comparison, so timing does not tell names apart.
        candidate = password if expected is None else expected
        return hmac.compare_digest(candidate.encode(), password.encode()) and expected is not None


_NO_USERS = Users()


class HttpUpstreamMode(StrEnum):
    """How a plain HTTP request goes through an HTTP(S) upstream proxy."""

    #: As an absolute-form request (the upstream sees every request): what every HTTP proxy
    #: takes, and what a proxy that refuses CONNECT to port 80 (squid's default) needs.
    FORWARD = "forward"
    #: Through a CONNECT tunnel to the target, kept for that upstream and target and reused by
    #: later requests: for upstreams that close their connection after every answer (as
    #: tinyproxy does), where forwarding costs a new connection per request.
    CONNECT = "connect"


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 8899),)
    default_pool: str = "default"
    acquire_timeout: float = 5.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    header_timeout: float = 10.0
    drain_timeout: float = 30.0
    users: Users = _NO_USERS
    deny_destinations: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Ports CONNECT and SOCKS may reach; empty allows every port.
    connect_ports: frozenset[int] = frozenset()
    log_level: str = "info"
    #: Retries in flight per pool: at most this share of its active requests,
    retry_budget_percent: float = 20.0
    #: but always this many.
    retry_budget_min: int = 3
    #: Seconds from sending a plain HTTP request to the first byte of its answer.
    response_timeout: float = 30.0
    #: Idle upstream connections kept for reuse, per upstream (and target, but for HTTP
    #: upstreams); 0 opens a connection per request.
    keepalive_max_idle: int = 32
    #: ...and in all (each is an open file: a large pool in rotation must not pile them up).
    keepalive_max_idle_total: int = 256
    keepalive_idle_timeout: float = 15.0
    #: Requests one connection may carry: each retirement costs a later request a new
    #: connection (at 100, one request in a hundred under steady load paid for a dial).
    keepalive_max_uses: int = 1000
    http_upstream_mode: HttpUpstreamMode = HttpUpstreamMode.FORWARD


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Where pools live. `url` may hold a database password: show `redacted_url()` instead."""

    url: str = "memory://"

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0].lower()

    def redacted_url(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"StorageSettings(url={self.redacted_url()!r})"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    #: None disables the admin listener.
    listen: ListenAddress | None = ListenAddress("127.0.0.1", 8900)
    #: The bearer token the admin API demands; None demands none (loopback only).
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    name: str
    selector: Selector = _POOL_DEFAULTS.selector
    sticky_ttl: float = _POOL_DEFAULTS.sticky_ttl
    retries: int = _POOL_DEFAULTS.retries
    #: Leases at once per upstream; None is unlimited.
    max_concurrency: int | None = _POOL_DEFAULTS.max_concurrency
    description: str = _POOL_DEFAULTS.description
    upstreams: tuple[Endpoint, ...] = ()
    health: HealthPolicy = _POOL_DEFAULTS.health
    on_sticky_failure: StickyFailure = _POOL_DEFAULTS.on_sticky_failure

    def to_pool(self) -> Pool:
        return Pool(
            name=self.name,
            selector=self.selector,
            sticky_ttl=self.sticky_ttl,
            retries=self.retries,
            max_concurrency=self.max_concurrency,
            description=self.description,
            health=self.health,
            on_sticky_failure=self.on_sticky_failure,
        )

    def to_upstreams(self) -> list[Upstream]:
        """Fresh `Upstream` records for storage (they are mutable, so never shared)."""
        return [Upstream(endpoint, self.name) for endpoint in self.upstreams]


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    listen: ListenAddress
    #: The pool this listener leases from; None leaves the choice to routing (the default pool).
    pool: str | None = None


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """The active checks: which stages run, how often, how many at once."""

    enabled: bool = True
    #: Seconds between rounds over every upstream (ejected and new ones are checked sooner).
    interval: float = 300.0
    #: Seconds each checker may take.
    timeout: float = 10.0
    #: Checks running at once.
    concurrency: int = 16
    #: A URL that echoes the caller's address and headers (JSON, or `NAME = value` lines);
    #: None skips the judge stage.
    judge_url: str | None = None
    #: URLs that must answer through the upstream.
    site_reach: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    gateway: GatewaySettings = GatewaySettings()
    storage: StorageSettings = StorageSettings()
    admin: AdminSettings = AdminSettings()
    pools: tuple[PoolSettings, ...] = ()
    #: The `[[listeners]]` entries; `all_listeners()` adds `gateway.listen`.
    listeners: tuple[ListenerSettings, ...] = ()
    #: The configuration file's path, or "defaults" when none was read.
    source: str = "defaults"
    checks: CheckSettings = CheckSettings()

    def all_listeners(self) -> tuple[ListenerSettings, ...]:
        """Every gateway listener: `gateway.listen` (routed, pool None), then `[[listeners]]`."""
        routed = tuple(ListenerSettings(address) for address in self.gateway.listen)
        return routed + self.listeners

    def pool(self, name: str) -> PoolSettings:
        """The pool called `name`; KeyError if there is none."""
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)
