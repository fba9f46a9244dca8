"""Health, stored: outcomes folded in by `core.health`'s policy, ejection, re-admission, history.

Each function runs inside the adapter's transaction with the upstream's row locked, so processes
sharing the database apply one policy to one state. An ejection also locks the pool's row (after
the upstream's: the catalog's lock order) so that two processes cannot both take the last
ejection the pool's `max_ejection_percent` allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core import health
from core.backlog import OutcomeWrite
from core.errors import UpstreamNotFound
from core.health import HealthRecord, HealthUpdate, RecordSource, Transition
from core.models import HealthPolicy, HealthStatus, Outcome, Upstream
from core.storage.sql.catalog import live_upstream
from core.storage.sql.leasing import load_pool
from core.storage.sql.rows import HEALTH_FIELDS, upstream_from_row
from core.storage.sql.statements import LIVE
from core.storage.sql.tables import health_history, pools, upstreams

__all__ = ["eject", "history", "readmit", "readmit_due", "record_outcomes"]

u = upstreams.c
h = health_history.c
_EJECTED = HealthStatus.EJECTED.value


async def record_outcomes(
    conn: AsyncConnection, writes: Sequence[OutcomeWrite]
) -> list[HealthUpdate | UpstreamNotFound]:
    """`Storage.record_outcome` for each of `writes`, in order, in one transaction: each upstream's
    row is locked once (all of them in key order, the order the lease statements take) and
    written once, its pool read once, the history rows inserted by one statement and trimmed
    once per upstream. A write for an upstream that is gone gets UpstreamNotFound, the others
    are recorded."""
    ids = sorted({write.upstream_id for write in writes})
    rows = (
        await conn.execute(
            select(upstreams).where(u.id.in_(ids), LIVE).order_by(u.key).with_for_update()
        )
    ).all()
    found = {row.id: (row.key, row.pool, upstream_from_row(row)) for row in rows}
    policies: dict[str, HealthPolicy] = {}
    results: list[HealthUpdate | UpstreamNotFound] = []
    history: list[dict[str, Any]] = []
    for write in writes:
        entry = found.get(write.upstream_id)
        if entry is None:
            results.append(UpstreamNotFound(write.upstream_id))
            continue
        key, pool_name, upstream = entry
        policy = policies.get(pool_name)
        if policy is None:
            pool = await load_pool(conn, pool_name)
            assert pool is not None  # an upstream's pool outlives it
            policy = policies[pool_name] = pool.health
        transition = Transition.NONE
        if health.observe(upstream, write.outcome, write.latency, write.now, policy):
            total, ejected = await _ejection_counts(conn, pool_name)
            if health.ejection_allowed(total, ejected, policy):
                end = health.ejection_end(upstream.times_ejected + 1, write.now, policy)
                _eject(upstream, end, write.now)
                transition = Transition.EJECTED
                # At once: the next ejection's count in this batch must see this one.
                await _save(conn, key, upstream)
            else:
                transition = Transition.PANIC
        results.append(HealthUpdate(replace(upstream), transition))
        history.append(
            {
                "upstream_key": key,
                "at": write.now,
                "outcome": write.outcome.value,
                "latency": write.latency,
                "source": write.source.value,
                "detail": write.detail,
            }
        )
    if history:
        await conn.execute(insert(health_history), history)
    for key, pool_name, upstream in found.values():
        await _save(conn, key, upstream)
        size = policies[pool_name].history_size
        newest = select(h.id).where(h.upstream_key == key).order_by(h.id.desc()).limit(size)
        await conn.execute(delete(health_history).where(h.upstream_key == key, h.id.not_in(newest)))
    return results


async def eject(conn: AsyncConnection, upstream_id: str, until: float, now: float) -> Upstream:
    row = await live_upstream(conn, upstream_id, lock=True)
    upstream = upstream_from_row(row)
    _eject(upstream, until, now)
    await _save(conn, row.key, upstream)
    return upstream


async def readmit(conn: AsyncConnection, upstream_id: str, now: float) -> Upstream:
    row = await live_upstream(conn, upstream_id, lock=True)
    upstream = upstream_from_row(row)
    _readmit(upstream, now)
    await _save(conn, row.key, upstream)
    return upstream


async def readmit_due(conn: AsyncConnection, now: float) -> list[Upstream]:
    rows = (
        await conn.execute(
            select(upstreams)
            .where(u.status == _EJECTED, u.ejected_until <= now, LIVE)
            .order_by(u.key)
            .with_for_update(skip_locked=True)
        )
    ).all()
    due = []
    for row in rows:
        upstream = upstream_from_row(row)
        _readmit(upstream, now)
        await _save(conn, row.key, upstream)
        due.append(upstream)
    return due


async def history(conn: AsyncConnection, upstream_id: str) -> list[HealthRecord]:
    row = await live_upstream(conn, upstream_id)
    rows = await conn.execute(
        select(h.at, h.outcome, h.latency, h.source, h.detail)
        .where(h.upstream_key == row.key)
        .order_by(h.id)
    )
    return [
        HealthRecord(r.at, Outcome(r.outcome), r.latency, RecordSource(r.source), r.detail)
        for r in rows
    ]


async def _ejection_counts(conn: AsyncConnection, pool: str) -> tuple[int, int]:
    """(live upstreams, ejected ones) of `pool`, with its row locked until commit."""
    await conn.execute(
        select(pools.c.key).where(pools.c.name == pool).with_for_update(key_share=True)
    )
    total, ejected = (
        await conn.execute(
            select(
                func.count(), func.coalesce(func.sum(case((u.status == _EJECTED, 1), else_=0)), 0)
            ).where(u.pool == pool, LIVE)
        )
    ).one()
    return int(total), int(ejected)


def _eject(upstream: Upstream, until: float, now: float) -> None:
    upstream.status = HealthStatus.EJECTED
    upstream.ejected_until = until
    upstream.times_ejected += 1
    upstream.checked_at = now


def _readmit(upstream: Upstream, now: float) -> None:
    upstream.status = HealthStatus.ACTIVE
    upstream.ejected_until = None
    upstream.failure_streak = 0
    upstream.checked_at = now


async def _save(conn: AsyncConnection, key: int, upstream: Upstream) -> None:
    values: dict[str, Any] = {name: getattr(upstream, name) for name in HEALTH_FIELDS}
    values["status"] = upstream.status.value
    await conn.execute(update(upstreams).where(u.key == key).values(values))
