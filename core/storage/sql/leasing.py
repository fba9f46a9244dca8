"""Leasing, one transaction per call: pick, grant, drop, sessions, renew, the sweep.

Every function here runs inside a transaction the adapter opened; none commits. The memory
adapter (`core.storage.memory`) is the reference for every behaviour: the same steps in the same
order, written against rows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import Select, Update, and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import NoUpstreamAvailable, SessionFailed
from core.filters import Filter, restricted_to_country
from core.models import HealthStatus, Lease, LeaseRequest, Pool, Selector, StickyFailure
from core.storage.sql.filters import SqlFilter, to_sql
from core.storage.sql.rows import decode_pool, lease_from_row, upstream_from_row
from core.storage.sql.statements import (
    ACTIVE,
    LIVE,
    Flavor,
    candidates,
    lease_select,
    pick_select,
)
from core.storage.sql.tables import leases, parted_sessions, pools, upstreams

__all__ = [
    "PREDICATE_BATCH",
    "Parted",
    "acquire",
    "drop",
    "expire",
    "grant",
    "lease_key",
    "list_leases",
    "load_pool",
    "pick",
    "renew",
    "unbind_session",
]

#: Candidates fetched at a time when a filter must be confirmed in Python.
PREDICATE_BATCH = 64

u = upstreams.c
_EJECTED = HealthStatus.EJECTED.value
_SessionKey = tuple[str, str, str]


class Parted(NamedTuple):
    """A session that left a failed upstream, until it binds anew (or, failed, until `until`)."""

    upstream_id: str
    country: str | None
    until: float | None


# The statements every lease runs are built once, with bound parameters: building a Core
# statement and its cache key costs more than SQLite takes to run it, and a statement object
# used again keeps its cache key.
_LOAD_POOL = select(pools.c.name, pools.c.settings).where(pools.c.name == bindparam("name"))
_DROP = delete(leases).where(leases.c.id == bindparam("id")).returning(leases.c.upstream_key)
_UNCOUNT = update(upstreams).where(u.key == bindparam("b_key")).values(active=u.active - 1)
_RECORD = leases.insert().returning(leases.c.id)


@cache
def _count_statement(flavor: Flavor) -> Update:
    """Count a grant on the upstream `b_key` of pool `b_pool` (an UPDATE's parameters may not
    be named after its table's columns)."""
    return (
        update(upstreams)
        .where(u.key == bindparam("b_key"))
        .values(
            active=u.active + 1,
            total_leases=u.total_leases + 1,
            last_leased=flavor.tick(bindparam("b_pool")),
        )
    )


@cache
def _pick_statement(flavor: Flavor, selector: Selector) -> Select[Any]:
    """The unfiltered pick of pool `pool`."""
    return pick_select(bindparam("pool"), selector, flavor, None, 1)


async def load_pool(conn: AsyncConnection, name: str) -> Pool | None:
    row = (await conn.execute(_LOAD_POOL, {"name": name})).first()
    return None if row is None else decode_pool(row.name, row.settings)


# -- choosing -------------------------------------------------------------------------------


async def pick(
    conn: AsyncConnection,
    flavor: Flavor,
    pool: Pool,
    request: LeaseRequest,
    *,
    wait: bool = False,
) -> Row[Any] | None:
    """The upstream row the request's selector chooses among those leasable now, locked; None
    when all are busy. NoUpstreamAvailable when none could ever be leased.

    With `wait` (PostgreSQL, the transaction holding no locks yet), leasable rows that were all
    locked by other transactions are not "busy": the pick waits for the first of them."""
    selector = request.selector or pool.selector
    flt = request.filters
    row: Row[Any] | None
    sql = None if flt is None else to_sql(flt)
    if sql is None:
        row = (await conn.execute(_pick_statement(flavor, selector), {"pool": pool.name})).first()
    elif sql.exact:
        stmt = pick_select(pool.name, selector, flavor, sql.clause, 1)
        row = (await conn.execute(stmt)).first()
    else:
        assert flt is not None
        return await _pick_checked(conn, flavor, pool, request, flt)
    if row is None and wait:
        row = await _pick_waiting(conn, flavor, pool.name, selector, sql)
    if row is None:
        await _explain_empty(conn, pool.name, flt)
    return row


async def _pick_checked(
    conn: AsyncConnection, flavor: Flavor, pool: Pool, request: LeaseRequest, flt: Filter
) -> Row[Any] | None:
    row = await _pick_confirmed(conn, flavor, pool, request, flt)
    if row is None:
        await _explain_empty(conn, pool.name, flt)
    return row


async def _pick_waiting(
    conn: AsyncConnection, flavor: Flavor, pool: str, selector: Selector, sql: SqlFilter | None
) -> Row[Any] | None:
    """The pick again, waiting for locked rows, when one is leasable by the snapshot."""
    clause = None if sql is None else sql.clause
    free = select(candidates(pool, selector, clause).with_only_columns(u.key).exists())
    if not (await conn.execute(free)).scalar():
        return None
    stmt = pick_select(pool, selector, flavor, clause, 1, wait=True)
    row: Row[Any] | None = (await conn.execute(stmt)).first()
    return row


async def _pick_confirmed(
    conn: AsyncConnection, flavor: Flavor, pool: Pool, request: LeaseRequest, flt: Filter
) -> Row[Any] | None:
    """Candidates in the selector's order, a batch at a time, until one passes in Python.

    The batch's rows stay locked until the transaction ends, so the one chosen cannot be
    taken by anyone else between the check and the grant."""
    selector = request.selector or pool.selector
    clause = to_sql(flt).clause
    rejected: list[int] = []
    while True:
        stmt = pick_select(pool.name, selector, flavor, clause, PREDICATE_BATCH)
        if rejected:
            stmt = stmt.where(u.key.not_in(rejected))
        rows: Sequence[Row[Any]] = (await conn.execute(stmt)).all()
        chosen: Row[Any] | None = next(
            (row for row in rows if flt.matches(upstream_from_row(row))), None
        )
        if chosen is not None:
            return chosen
        if len(rows) < PREDICATE_BATCH:
            return None
        rejected.extend(row.key for row in rows)


async def _explain_empty(conn: AsyncConnection, pool: str, flt: Filter | None) -> None:
    """Nothing was leasable: raise if nothing ever could be (waiting would be in vain)."""
    if flt is None:
        counts = select(
            func.count(), func.coalesce(func.sum(case((u.status == _EJECTED, 1), else_=0)), 0)
        ).where(u.pool == pool, LIVE)
        total, ejected = (await conn.execute(counts)).one()
        if total == ejected:
            reason = "all upstreams are ejected" if total else "the pool has no upstreams"
            raise NoUpstreamAvailable(pool, waited=0.0, reason=reason)
        return
    sql = to_sql(flt)
    candidates = select(upstreams).where(u.pool == pool, u.status == ACTIVE, LIVE, sql.clause)
    if sql.exact:
        found = (await conn.execute(candidates.limit(1))).first() is not None
    else:
        rows = await conn.stream(candidates)
        found = False
        async for row in rows:
            if flt.matches(upstream_from_row(row)):
                found = True
                break
        await rows.close()
    if not found:
        raise NoUpstreamAvailable(pool, waited=0.0, reason="no active upstream matches the filters")


# -- granting and dropping ------------------------------------------------------------------


async def grant(
    conn: AsyncConnection,
    flavor: Flavor,
    row: Row[Any],
    request: LeaseRequest,
    holder: str,
    now: float,
    expires_at: float | None,
    *,
    idle_ttl: float | None = None,
    rebound_from: str | None = None,
) -> Lease:
    """Lease the (locked) upstream `row`: count it on the upstream, record the lease."""
    await conn.execute(_count_statement(flavor), {"b_key": row.key, "b_pool": row.pool})
    inserted = await conn.execute(
        _RECORD,
        {
            "upstream_key": row.key,
            "pool": row.pool,
            "consumer": request.consumer,
            "session": request.session,
            "bound": request.session is not None,
            "acquired_at": now,
            "expires_at": expires_at,
            "holder": holder,
            "idle_ttl": idle_ttl,
            "uses": 1,
            "rebound_from": rebound_from,
        },
    )
    return Lease(
        str(inserted.scalar_one()),
        upstream_from_row(row),
        row.pool,
        request.consumer,
        request.session,
        now,
        expires_at,
        holder,
        idle_ttl=idle_ttl,
        rebound_from=rebound_from,
    )


async def drop(conn: AsyncConnection, lease_id: int) -> bool:
    """Undo a grant. False if the lease was not held."""
    upstream_key = (await conn.execute(_DROP, {"id": lease_id})).scalar_one_or_none()
    if upstream_key is None:
        return False
    await conn.execute(_UNCOUNT, {"b_key": upstream_key})
    return True


# -- acquire --------------------------------------------------------------------------------


async def acquire(
    conn: AsyncConnection,
    flavor: Flavor,
    pool: Pool,
    request: LeaseRequest,
    holder: str,
    now: float,
) -> Lease | None:
    if request.session is not None:
        return await _acquire_session(conn, flavor, pool, request, holder, now)
    # Nothing is locked yet, so the pick may wait for rows locked by others (a session's
    # acquire, holding locks already, must not).
    row = await pick(conn, flavor, pool, request, wait=flavor.postgres)
    if row is None:
        return None
    expires_at = None if request.duration is None else now + request.duration
    return await grant(conn, flavor, row, request, holder, now, expires_at)


async def _acquire_session(
    conn: AsyncConnection,
    flavor: Flavor,
    pool: Pool,
    request: LeaseRequest,
    holder: str,
    now: float,
) -> Lease | None:
    assert request.session is not None
    key = (pool.name, request.consumer, request.session)
    ttl = pool.sticky_ttl if request.session_ttl is None else request.session_ttl
    if flavor.postgres:
        # One acquirer per session at a time, across processes: the second waits for the
        # first to commit and then finds its lease, instead of binding a second upstream.
        await conn.execute(
            select(func.pg_advisory_xact_lock(func.hashtextextended(json.dumps(key), 0)))
        )
    parted = await _load_parted(conn, key)
    if parted is not None and parted.until is not None:
        if parted.until > now:
            raise SessionFailed(pool.name, request.session, parted.upstream_id)
        await _forget_parted(conn, key)
        parted = None
    row = (
        await conn.execute(
            lease_select()
            .where(
                leases.c.pool == key[0],
                leases.c.consumer == key[1],
                leases.c.session == key[2],
                leases.c.bound,
            )
            .with_for_update(of=leases)
        )
    ).first()
    if row is not None:
        alive = row.expires_at is None or row.expires_at > now
        healthy = not row.retired and row.status == ACTIVE
        if alive and healthy:
            await conn.execute(
                update(leases)
                .where(leases.c.id == row.lease_id)
                .values(uses=leases.c.uses + 1, expires_at=now + ttl)
            )
            lease = lease_from_row(row, upstream_from_row(row))
            lease.uses += 1
            lease.expires_at = now + ttl
            return lease
        if not alive:
            await drop(conn, row.lease_id)  # idle too long: a new session
        else:
            fail = pool.on_sticky_failure is StickyFailure.FAIL
            parted = await _unbind(conn, flavor, key, row, now, row.idle_ttl if fail else None)
            if fail:
                raise SessionFailed(pool.name, request.session, parted.upstream_id)
    if (
        parted is not None
        and parted.country is not None
        and pool.on_sticky_failure is StickyFailure.REBIND_MATCHING
    ):
        request = restricted_to_country(request, parted.country)
    picked = await pick(conn, flavor, pool, request)
    if picked is None:
        return None
    lease = await grant(
        conn,
        flavor,
        picked,
        request,
        holder,
        now,
        now + ttl,
        idle_ttl=ttl,
        rebound_from=None if parted is None else parted.upstream_id,
    )
    if parted is not None:
        await _forget_parted(conn, key)
    return lease


# -- sessions -------------------------------------------------------------------------------


async def unbind_session(
    conn: AsyncConnection, flavor: Flavor, lease: Lease, now: float, fail_for: float | None
) -> None:
    if lease.session is None:
        return
    lease_id = lease_key(lease)
    if lease_id is None:
        return
    row = (
        await conn.execute(
            lease_select().where(leases.c.id == lease_id, leases.c.bound).with_for_update(of=leases)
        )
    ).first()
    if row is not None:
        key = (row.lease_pool, row.consumer, row.session)
        await _unbind(conn, flavor, key, row, now, fail_for)


async def _unbind(
    conn: AsyncConnection,
    flavor: Flavor,
    key: _SessionKey,
    row: Row[Any],
    now: float,
    fail_for: float | None,
) -> Parted:
    await conn.execute(update(leases).where(leases.c.id == row.lease_id).values(bound=False))
    parted = Parted(row.id, row.country, None if fail_for is None else now + fail_for)
    values = dict(zip(("pool", "consumer", "session"), key, strict=True)) | parted._asdict()
    stmt = flavor.insert(parted_sessions).values(values)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["pool", "consumer", "session"],
            set_={name: stmt.excluded[name] for name in ("upstream_id", "country", "until")},
        )
    )
    if row.expires_at is not None:
        await drop(conn, row.lease_id)
    # else: in use; its last user's renew (with an expiry) releases it.
    return parted


async def _load_parted(conn: AsyncConnection, key: _SessionKey) -> Parted | None:
    row = (
        await conn.execute(
            select(
                parted_sessions.c.upstream_id, parted_sessions.c.country, parted_sessions.c.until
            ).where(*_parted_key(key))
        )
    ).first()
    return None if row is None else Parted(row.upstream_id, row.country, row.until)


async def _forget_parted(conn: AsyncConnection, key: _SessionKey) -> None:
    await conn.execute(delete(parted_sessions).where(*_parted_key(key)))


def _parted_key(key: _SessionKey) -> list[Any]:
    table = parted_sessions.c
    return [table.pool == key[0], table.consumer == key[1], table.session == key[2]]


# -- renew and expiry -----------------------------------------------------------------------


def lease_key(lease: Lease) -> int | None:
    """The row id of a lease this storage granted (None for anyone else's)."""
    try:
        return int(lease.id)
    except ValueError:
        return None


async def renew(conn: AsyncConnection, lease_id: int, expires_at: float | None) -> bool:
    row = (
        await conn.execute(
            select(leases.c.session, leases.c.bound)
            .where(leases.c.id == lease_id)
            .with_for_update()
        )
    ).first()
    if row is None:
        return False
    if expires_at is not None and row.session is not None and not row.bound:
        await drop(conn, lease_id)  # its session left it: the last user is done
        return False
    await conn.execute(update(leases).where(leases.c.id == lease_id).values(expires_at=expires_at))
    return True


async def expire(conn: AsyncConnection, now: float, dead_holders: Any) -> list[Lease]:
    """Release leases that expired at or before `now`, and every lease of `dead_holders` (a
    subquery of holder ids); return them, soonest expiry first."""
    due = and_(leases.c.expires_at.is_not(None), leases.c.expires_at <= now)
    # Locked in id order, then their upstreams in key order: the order batched releases
    # take (`fast`), so that a sweep and a release cannot deadlock.
    doomed = (
        select(leases.c.id)
        .where(or_(due, leases.c.holder.in_(dead_holders)))
        .order_by(leases.c.id)
        .with_for_update()
    )
    deleted = (
        await conn.execute(
            delete(leases)
            .where(leases.c.id.in_(doomed.scalar_subquery()))
            .returning(*(column for column in leases.c))
        )
    ).all()
    if not deleted:
        return []
    per_upstream = Counter(row.upstream_key for row in deleted)
    await conn.execute(
        update(upstreams).where(u.key == bindparam("k")).values(active=u.active - bindparam("n")),
        [{"k": k, "n": n} for k, n in sorted(per_upstream.items())],
    )
    rows = await conn.execute(select(upstreams).where(u.key.in_(sorted(per_upstream))))
    by_key = {row.key: upstream_from_row(row) for row in rows}
    expired = [
        Lease(
            str(row.id),
            by_key[row.upstream_key],
            row.pool,
            row.consumer,
            row.session,
            row.acquired_at,
            row.expires_at,
            row.holder,
            idle_ttl=row.idle_ttl,
            uses=row.uses,
            rebound_from=row.rebound_from,
        )
        for row in deleted
    ]
    never = float("inf")
    expired.sort(key=lambda lease: (lease.expires_at or never, int(lease.id)))
    return expired


async def list_leases(conn: AsyncConnection, pool: str | None) -> list[Lease]:
    stmt = lease_select().order_by(leases.c.id)
    if pool is not None:
        stmt = stmt.where(leases.c.pool == pool)
    rows = await conn.execute(stmt)
    return [lease_from_row(row, upstream_from_row(row)) for row in rows]
