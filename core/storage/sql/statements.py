"""Statement pieces shared by the adapter's operations: selector orders, picks, upserts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Float, Select, cast, extract, func, not_, select
from sqlalchemy.dialects import postgresql, sqlite

from core.models import HealthStatus, Selector
from core.storage.sql.tables import LEASE_TICK, leases, upstreams

__all__ = [
    "ACTIVE",
    "LEASE_COLUMNS",
    "LIVE",
    "Flavor",
    "candidates",
    "leasable",
    "lease_select",
    "pick_select",
    "selector_order",
]

ACTIVE = HealthStatus.ACTIVE.value
u = upstreams.c
#: Not removed from the catalog (a removed upstream's row stays while it is leased).
LIVE = not_(u.retired)

#: A lease's columns, labelled apart from its upstream's (`rows.lease_from_row` reads these).
LEASE_COLUMNS = (
    leases.c.id.label("lease_id"),
    leases.c.pool.label("lease_pool"),
    leases.c.consumer,
    leases.c.session,
    leases.c.bound,
    leases.c.acquired_at,
    leases.c.expires_at,
    leases.c.holder,
    leases.c.idle_ttl,
    leases.c.uses,
    leases.c.rebound_from,
    leases.c.upstream_key,
)


@dataclass(frozen=True, slots=True)
class Flavor:
    """What differs between the two databases, in one place."""

    postgres: bool

    def tick(self, pool: str | ColumnElement[str]) -> ColumnElement[Any]:
        """The next round-robin tick: a sequence on PostgreSQL; on SQLite, whose writers are
        serialised, one more than the pool's highest."""
        if self.postgres:
            return LEASE_TICK.next_value()
        highest = select(func.coalesce(func.max(u.last_leased), 0)).where(u.pool == pool)
        return highest.scalar_subquery() + 1

    def uniform(self) -> ColumnElement[float]:
        """A uniform random number in [0, 1)."""
        if self.postgres:
            return func.random()
        # SQLite's random() is a signed 64-bit integer.
        return func.random() / 18446744073709551616.0 + 0.5

    def clock(self) -> ColumnElement[float]:
        """The database server's wall clock, in seconds since the epoch: holders' heartbeats
        are judged by it, so clocks that differ between gateway hosts do not matter."""
        if self.postgres:
            return cast(extract("epoch", func.clock_timestamp()), Float)
        return (func.julianday("now") - 2440587.5) * 86400.0

    def insert(self, table: Any) -> postgresql.Insert | sqlite.Insert:
        """An INSERT that can take ON CONFLICT clauses (both dialects spell them alike)."""
        if self.postgres:
            return postgresql.insert(table)
        return sqlite.insert(table)


def selector_order(selector: Selector, flavor: Flavor) -> list[ColumnElement[Any]]:
    """ORDER BY for a selector; the first row is the one it picks."""
    if selector is Selector.ROUND_ROBIN:
        return [u.last_leased, u.key]  # least recently leased: one rotation for all processes
    if selector is Selector.LEAST_USED:
        return [u.active, u.last_leased, u.key]
    if selector is Selector.FIRST_AVAILABLE:
        return [u.key]
    if selector is Selector.RANDOM:
        return [flavor.uniform()]
    if selector is Selector.LOWEST_LATENCY:
        # Unmeasured upstreams first, so that every upstream gets measured.
        return [func.coalesce(u.latency_ewma, -1.0), u.key]
    # Weighted: the smallest of Exp(1) / weight wins with probability weight / total
    # (Efraimidis-Spirakis), and it stays exact when only part of the pool is eligible.
    return [-func.ln(1.0 - flavor.uniform()) / u.weight]


def leasable(pool: str | ColumnElement[str]) -> list[ColumnElement[bool]]:
    """Upstreams of `pool` that could be leased now."""
    return [u.pool == pool, u.status == ACTIVE, LIVE, u.active < u.lim]


def candidates(
    pool: str | ColumnElement[str], selector: Selector, clause: ColumnElement[bool] | None
) -> Select[Any]:
    """The upstreams a selector may lease now, in no order and unlocked."""
    stmt = select(upstreams).where(*leasable(pool))
    if selector is Selector.WEIGHTED:
        stmt = stmt.where(u.weight > 0)
    if clause is not None:
        stmt = stmt.where(clause)
    return stmt


def pick_select(
    pool: str | ColumnElement[str],
    selector: Selector,
    flavor: Flavor,
    clause: ColumnElement[bool] | None,
    limit: int | ColumnElement[int],
    *,
    wait: bool = False,
) -> Select[Any]:
    """The upstreams a selector would lease next, locked. PostgreSQL skips rows other
    transactions hold (they are being leased or given back right now), or with `wait` waits
    for them: a pick that would find nothing but locked rows, when capacity is there."""
    stmt = candidates(pool, selector, clause)
    stmt = stmt.order_by(*selector_order(selector, flavor)).limit(limit)
    return stmt.with_for_update(skip_locked=not wait)


def lease_select() -> Select[Any]:
    """Leases joined with their upstreams."""
    return select(*LEASE_COLUMNS, *upstreams.c).join_from(
        leases, upstreams, leases.c.upstream_key == u.key
    )
