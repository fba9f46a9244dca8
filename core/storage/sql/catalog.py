"""Pools and upstreams: add, change, remove, read; and the pool stats snapshot.

Lock order, to keep PostgreSQL free of deadlocks: upstream rows before their pool's row, in every
transaction that takes both (health updates lock the pool row only to decide an ejection), and
several upstream rows in key order, as batched releases and sweeps take them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import CatalogError, PoolNotFound, UpstreamNotFound
from core.models import HealthStatus, Pool, PoolStats, Upstream
from core.storage.interface import UPSTREAM_ATTRIBUTES
from core.storage.sql.leasing import load_pool
from core.storage.sql.rows import (
    decode_pool,
    encode_pool,
    encode_tags,
    limit_of,
    upstream_from_row,
    upstream_values,
)
from core.storage.sql.statements import ACTIVE, LIVE
from core.storage.sql.tables import (
    UNLIMITED,
    health_history,
    leases,
    parted_sessions,
    pools,
    upstreams,
)

__all__ = [
    "add_pool",
    "add_upstreams",
    "collect_retired",
    "get_pool",
    "get_upstream",
    "list_pools",
    "list_upstreams",
    "live_upstream",
    "remove_pool",
    "remove_upstream",
    "stats",
    "update_pool",
    "update_upstream",
]

u = upstreams.c
#: Rows per INSERT when adding upstreams in bulk.
_INSERT_CHUNK = 5_000


async def add_pool(conn: AsyncConnection, pool: Pool) -> None:
    taken = await conn.execute(select(pools.c.key).where(pools.c.name == pool.name))
    if taken.first() is not None:
        raise CatalogError(f"pool {pool.name!r} already exists")
    await conn.execute(insert(pools).values(encode_pool(pool)))


async def update_pool(conn: AsyncConnection, pool: Pool) -> None:
    if await load_pool(conn, pool.name) is None:
        raise PoolNotFound(pool.name)
    # Upstreams first, in key order (see the module's lock order), then the pool.
    await conn.execute(
        select(u.key).where(u.pool == pool.name, LIVE).order_by(u.key).with_for_update()
    )
    limit = UNLIMITED if pool.max_concurrency is None else pool.max_concurrency
    await conn.execute(
        update(upstreams)
        .where(u.pool == pool.name, LIVE)
        .values(lim=func.coalesce(u.max_concurrency, limit))
    )
    values = encode_pool(pool)
    del values["name"]
    await conn.execute(update(pools).where(pools.c.name == pool.name).values(values))


async def remove_pool(conn: AsyncConnection, name: str) -> None:
    if await load_pool(conn, name) is None:
        raise PoolNotFound(name)
    # Lock the pool's upstreams: an acquire in flight either commits first (and is counted
    # below) or finds them gone.
    await conn.execute(select(u.key).where(u.pool == name).order_by(u.key).with_for_update())
    held = (await conn.execute(select(func.count()).where(leases.c.pool == name))).scalar_one()
    if held:
        raise CatalogError(f"pool {name!r} still holds {held} leases")
    keys = select(u.key).where(u.pool == name).scalar_subquery()
    await conn.execute(delete(health_history).where(health_history.c.upstream_key.in_(keys)))
    await conn.execute(delete(parted_sessions).where(parted_sessions.c.pool == name))
    await conn.execute(delete(upstreams).where(u.pool == name))
    await conn.execute(delete(pools).where(pools.c.name == name))


async def get_pool(conn: AsyncConnection, name: str) -> Pool:
    pool = await load_pool(conn, name)
    if pool is None:
        raise PoolNotFound(name)
    return pool


async def list_pools(conn: AsyncConnection) -> list[Pool]:
    rows = await conn.execute(select(pools.c.name, pools.c.settings).order_by(pools.c.key))
    return [decode_pool(row.name, row.settings) for row in rows]


async def add_upstreams(conn: AsyncConnection, batch: Iterable[Upstream]) -> int:
    """All or none: CatalogError on a duplicate id, PoolNotFound on an unknown pool."""
    members = list(batch)
    names = sorted({upstream.pool for upstream in members})
    limits: dict[str, int | None] = {}
    if names:
        rows = await conn.execute(
            select(pools.c.name, pools.c.max_concurrency).where(pools.c.name.in_(names))
        )
        limits = {row.name: row.max_concurrency for row in rows}
    seen: set[str] = set()
    for upstream in members:
        if upstream.pool not in limits:
            raise PoolNotFound(upstream.pool)
        if upstream.id in seen:
            raise CatalogError(f"upstream {upstream.id!r} already exists")
        seen.add(upstream.id)
    # Check every chunk before writing any: all or none. (A concurrent add of the same id
    # still fails, on the unique index, and rolls the whole batch back.)
    chunks = [
        members[start : start + _INSERT_CHUNK] for start in range(0, len(members), _INSERT_CHUNK)
    ]
    for chunk in chunks:
        taken = await conn.execute(
            select(u.id).where(u.id.in_([m.id for m in chunk]), LIVE).limit(1)
        )
        duplicate = taken.scalar_one_or_none()
        if duplicate is not None:
            raise CatalogError(f"upstream {duplicate!r} already exists")
    for chunk in chunks:
        await conn.execute(insert(upstreams), [upstream_values(m, limits[m.pool]) for m in chunk])
    return len(members)


async def update_upstream(
    conn: AsyncConnection, upstream_id: str, changes: dict[str, Any]
) -> Upstream:
    unknown = set(changes) - UPSTREAM_ATTRIBUTES
    if unknown:
        raise CatalogError(f"cannot change upstream attributes {sorted(unknown)}")
    row = await live_upstream(conn, upstream_id, lock=True)
    upstream = upstream_from_row(row)
    for name, value in changes.items():
        setattr(upstream, name, value)
    if upstream.country is not None:
        upstream.country = upstream.country.upper()
    pool_limit = (
        await conn.execute(select(pools.c.max_concurrency).where(pools.c.name == upstream.pool))
    ).scalar_one_or_none()
    values: dict[str, Any] = {name: getattr(upstream, name) for name in changes}
    values["country"] = upstream.country
    if "tags" in values:
        values["tags"] = encode_tags(upstream.tags)
    values["lim"] = limit_of(upstream.max_concurrency, pool_limit)
    await conn.execute(update(upstreams).where(u.key == row.key).values(values))
    return upstream


async def remove_upstream(conn: AsyncConnection, upstream_id: str) -> None:
    """Stop leasing it. A row still leased stays, retired, until its last lease is released
    (`collect_retired`); its history goes at once, as the memory adapter's does."""
    row = await live_upstream(conn, upstream_id, lock=True)
    await conn.execute(delete(health_history).where(health_history.c.upstream_key == row.key))
    if row.active:
        await conn.execute(update(upstreams).where(u.key == row.key).values(retired=True))
        return
    await _delete_upstreams(conn, [(row.key, row.pool, row.total_leases)])


async def collect_retired(conn: AsyncConnection) -> None:
    """Delete removed upstreams whose last lease has been released."""
    rows = (
        await conn.execute(
            select(u.key, u.pool, u.total_leases)
            .where(u.retired, u.active == 0)
            .with_for_update(skip_locked=True)
        )
    ).all()
    if rows:
        await _delete_upstreams(conn, [(row.key, row.pool, row.total_leases) for row in rows])


async def _delete_upstreams(conn: AsyncConnection, rows: list[tuple[int, str, int]]) -> None:
    await conn.execute(delete(upstreams).where(u.key.in_([key for key, _, _ in rows])))
    # Their grants still count in the pool's total_leases.
    per_pool: dict[str, int] = {}
    for _, pool, total in rows:
        per_pool[pool] = per_pool.get(pool, 0) + total
    for pool, total in sorted(per_pool.items()):
        await conn.execute(
            update(pools)
            .where(pools.c.name == pool)
            .values(retired_leases=pools.c.retired_leases + total)
        )


async def live_upstream(conn: AsyncConnection, upstream_id: str, *, lock: bool = False) -> Any:
    stmt = select(upstreams).where(u.id == upstream_id, LIVE)
    if lock:
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    if row is None:
        raise UpstreamNotFound(upstream_id)
    return row


async def get_upstream(conn: AsyncConnection, upstream_id: str) -> Upstream:
    return upstream_from_row(await live_upstream(conn, upstream_id))


async def list_upstreams(conn: AsyncConnection, pool: str) -> list[Upstream]:
    rows = (await conn.execute(select(upstreams).where(u.pool == pool, LIVE).order_by(u.key))).all()
    if not rows and await load_pool(conn, pool) is None:
        raise PoolNotFound(pool)
    return [upstream_from_row(row) for row in rows]


def _count(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


async def stats(conn: AsyncConnection, name: str, now: float) -> PoolStats:
    row = (
        await conn.execute(
            select(pools.c.settings, pools.c.retired_leases).where(pools.c.name == name)
        )
    ).first()
    if row is None:
        raise PoolNotFound(name)
    threshold = decode_pool(name, row.settings).health.failures_to_eject
    ejected = HealthStatus.EJECTED.value
    counts = (
        await conn.execute(
            select(
                _count(LIVE),
                _count(and_(LIVE, u.status == ejected)),
                _count(and_(LIVE, u.status == ACTIVE, u.active < u.lim)),
                _count(u.active > 0),
                func.coalesce(func.sum(u.active), 0),
                func.coalesce(func.sum(u.total_leases), 0),
                _count(and_(LIVE, u.status == ACTIVE, u.failure_streak >= threshold)),
            ).where(u.pool == name)
        )
    ).one()
    total, ejected_count, available, leased, held, granted, kept_failing = (int(c) for c in counts)
    return PoolStats(
        pool=name,
        total=total,
        active=total - ejected_count,
        available=available,
        leased=leased,
        ejected=ejected_count,
        leases_held=held,
        total_leases=granted + int(row.retired_leases),
        collected_at=now,
        panic=kept_failing > 0,
    )
