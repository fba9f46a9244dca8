"""The leasing core's data: plain slotted dataclasses, validated where data enters, not here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from core.endpoints import Endpoint, Scheme, parse_upstream_url

if TYPE_CHECKING:
    from core.filters import Filter

__all__ = [
    "Consumer",
    "HealthPolicy",
    "HealthStatus",
    "Lease",
    "LeaseRequest",
    "Outcome",
    "Pool",
    "PoolStats",
    "Selector",
    "StickyFailure",
    "Upstream",
    "upstream_id_for",
]


class Selector(StrEnum):
    FIRST_AVAILABLE = "first_available"
    LEAST_USED = "least_used"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"
    LOWEST_LATENCY = "lowest_latency"
    WEIGHTED = "weighted"


class HealthStatus(StrEnum):
    ACTIVE = "active"
    EJECTED = "ejected"


class Outcome(StrEnum):
    """How one attempt through an upstream ended."""

    OK = "ok"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    PROXY_AUTH_FAILED = "proxy_auth_failed"
    PROXY_ERROR = "proxy_error"
    TLS_ERROR = "tls_error"
    RESET = "reset"
    READ_TIMEOUT = "read_timeout"
    # The target's fault, seen through a working upstream: never held against the upstream.
    TARGET_REFUSED = "target_refused"
    TARGET_UNREACHABLE = "target_unreachable"
    TARGET_ERROR = "target_error"

    @property
    def counts_against_upstream(self) -> bool:
        return self in _UPSTREAM_FAULTS

    @property
    def is_target_fault(self) -> bool:
        return self in _TARGET_FAULTS


_UPSTREAM_FAULTS: Final = frozenset(
    {
        Outcome.CONNECT_REFUSED,
        Outcome.CONNECT_TIMEOUT,
        Outcome.PROXY_AUTH_FAILED,
        Outcome.PROXY_ERROR,
        Outcome.TLS_ERROR,
    }
)
_TARGET_FAULTS: Final = frozenset(
    {Outcome.TARGET_REFUSED, Outcome.TARGET_UNREACHABLE, Outcome.TARGET_ERROR}
)


class StickyFailure(StrEnum):
    """What a session does when its upstream fails or is ejected."""

    #: Bind the session to another upstream, keeping its id.
    REBIND = "rebind"
    #: Bind it to another upstream with the same country as the failed one.
    REBIND_MATCHING = "rebind_matching"
    #: Its requests fail until the session expires.
    FAIL = "fail"


@dataclass(slots=True, frozen=True)
class HealthPolicy:
    """When a pool ejects its upstreams (see `core.health`)."""

    #: Consecutive upstream-side failures that eject (a rejected credential ejects at once).
    failures_to_eject: int = 5
    #: An ejection lasts this many seconds times the number of times the upstream was ejected,
    base_ejection_s: float = 30.0
    #: up to this.
    max_ejection_s: float = 300.0
    #: Never more of the pool ejected than this; beyond it the pool panics and keeps them.
    max_ejection_percent: float = 50.0
    #: The sliding window of the success rate, in seconds.
    window_s: float = 60.0
    #: Eject upstreams whose success rate is far below the pool's (checked periodically).
    success_rate_ejection: bool = False
    success_rate_min_requests: int = 20
    success_rate_min_upstreams: int = 5
    success_rate_stdev_factor: float = 1.9
    #: Results kept per upstream for inspection.
    history_size: int = 50


@dataclass(slots=True)
class Pool:
    name: str
    selector: Selector = Selector.ROUND_ROBIN
    sticky_ttl: float = 600.0
    retries: int = 2
    #: Leases allowed at once per upstream, unless the upstream sets its own; None is unlimited.
    max_concurrency: int | None = None
    description: str = ""
    health: HealthPolicy = field(default_factory=HealthPolicy)
    on_sticky_failure: StickyFailure = StickyFailure.REBIND


def upstream_id_for(pool: str, endpoint: Endpoint) -> str:
    """A short id, stable across processes, that can be shown where the address must not be."""
    digest = hashlib.blake2b(f"{pool}\n{endpoint.url()}".encode(), digest_size=6).hexdigest()
    return f"up-{digest}"


@dataclass(slots=True, eq=False)
class Upstream:
    """One way out, and what is known of its health.

    Storage hands these out; callers treat them as read-only and change them through storage.
    """

    endpoint: Endpoint
    pool: str
    id: str = ""
    country: str | None = None
    city: str | None = None
    asn: int | None = None
    isp: str | None = None
    source: str | None = None
    tags: frozenset[str] = frozenset()
    weight: float = 1.0
    #: Overrides the pool's `max_concurrency` when set.
    max_concurrency: int | None = None
    latitude: float | None = None
    longitude: float | None = None
    # Health, written by `Storage.record_outcome` and ejection.
    status: HealthStatus = HealthStatus.ACTIVE
    failure_streak: int = 0
    latency_ewma: float | None = None
    last_error: str | None = None
    checked_at: float | None = None
    ejected_until: float | None = None
    times_ejected: int = 0
    # The success-rate window: the current bucket and the one before (`core.health`).
    window_start: float | None = None
    window_ok: int = 0
    window_failed: int = 0
    previous_ok: int = 0
    previous_failed: int = 0

    def __post_init__(self) -> None:
        if not self.id:
            self.id = upstream_id_for(self.pool, self.endpoint)
        if self.country is not None:
            self.country = self.country.upper()

    @classmethod
    def from_url(cls, url: str, pool: str, **attributes: object) -> Upstream:
        return cls(parse_upstream_url(url), pool, **attributes)  # type: ignore[arg-type]

    @property
    def scheme(self) -> Scheme:
        return self.endpoint.scheme

    def __repr__(self) -> str:
        return f"Upstream({self.id!r}, {self.endpoint.redacted()!r}, pool={self.pool!r})"


@dataclass(slots=True, frozen=True)
class Consumer:
    """Who holds leases: a gateway account, or `default`."""

    name: str = "default"


# The __init__ written out (init=False): compiled (setup.py), the one a dataclass generates
# runs interpreted, and a lease is made for every request.
@dataclass(slots=True, eq=False, init=False)
class Lease:
    """The right to use one upstream until released or, if `expires_at` is set, until then."""

    id: str
    upstream: Upstream
    pool: str
    consumer: str
    session: str | None
    acquired_at: float
    expires_at: float | None
    holder: str
    #: A session's idle lifetime: each use pushes `expires_at` to now plus this.
    idle_ttl: float | None = None
    #: How many acquires this lease has served: more than one for a session's lease.
    uses: int = 1
    #: Set on a session's new lease when the session left a failed upstream: that one's id.
    rebound_from: str | None = None

    def __init__(
        self,
        id: str,
        upstream: Upstream,
        pool: str,
        consumer: str,
        session: str | None,
        acquired_at: float,
        expires_at: float | None,
        holder: str,
        idle_ttl: float | None = None,
        uses: int = 1,
        rebound_from: str | None = None,
    ) -> None:
        self.id = id
        self.upstream = upstream
        self.pool = pool
        self.consumer = consumer
        self.session = session
        self.acquired_at = acquired_at
        self.expires_at = expires_at
        self.holder = holder
        self.idle_ttl = idle_ttl
        self.uses = uses
        self.rebound_from = rebound_from

    @property
    def upstream_id(self) -> str:
        return self.upstream.id


@dataclass(slots=True)
class LeaseRequest:
    pool: str
    consumer: str = "default"
    #: A client-chosen id: requests with the same (pool, consumer, session) share one lease.
    session: str | None = None
    filters: Filter | None = None
    selector: Selector | None = None
    #: Seconds until the lease expires; None holds it until released.
    duration: float | None = None
    #: Idle lifetime of a session; None takes the pool's `sticky_ttl`.
    session_ttl: float | None = None


@dataclass(slots=True, frozen=True)
class PoolStats:
    pool: str
    total: int
    #: Not ejected.
    active: int
    #: Not ejected and under their concurrency limit: could be leased now.
    available: int
    #: Upstreams holding at least one lease.
    leased: int
    ejected: int
    leases_held: int
    #: Leases granted since the pool was created (a session's lease counts once).
    total_leases: int
    collected_at: float
    #: An upstream that failed enough to be ejected is kept, because the pool is at its
    #: `max_ejection_percent`.
    panic: bool = False
