"""Lease holders' heartbeats: who is alive, by the database's own clock.

Each gateway process holds its leases under an instance id and refreshes that id's `last_seen`
every few seconds (and in every sweep it runs). A sweep releases the leases of holders unseen
for longer than a grace period: a crashed process's leases come back without anyone's help.
Sweeps running in every process at once are safe: a lease row is deleted once, and only the
process that deleted it counts it off its upstream.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import Select, bindparam, delete, exists, false, select
from sqlalchemy.ext.asyncio import AsyncConnection

from core.storage.sql.statements import Flavor
from core.storage.sql.tables import holders, leases

__all__ = ["HOLDER_RETENTION", "beat", "dead_holders", "forget_dead", "nobody"]

#: Seconds a dead holder's row is kept after its leases are gone (it may yet come back).
HOLDER_RETENTION = 3600.0


async def beat(conn: AsyncConnection, flavor: Flavor, ids: Collection[str]) -> None:
    """Mark `ids` alive now (creating their rows if need be)."""
    if not ids:
        return
    stmt = flavor.insert(holders).values(id=bindparam("holder"), last_seen=flavor.clock())
    stmt = stmt.on_conflict_do_update(
        index_elements=["id"], set_={"last_seen": stmt.excluded.last_seen}
    )
    await conn.execute(stmt, [{"holder": holder} for holder in sorted(ids)])


def dead_holders(flavor: Flavor, grace: float) -> Select[Any]:
    """Ids of holders unseen for more than `grace` seconds."""
    return select(holders.c.id).where(holders.c.last_seen < flavor.clock() - grace)


def nobody() -> Select[Any]:
    """No holder: what a sweep judges dead while it cannot yet tell the dead from the silent."""
    return select(holders.c.id).where(false())


async def forget_dead(conn: AsyncConnection, flavor: Flavor, grace: float) -> None:
    """Delete rows of holders long dead that hold nothing."""
    cutoff = flavor.clock() - max(grace, HOLDER_RETENTION)
    await conn.execute(
        delete(holders).where(
            holders.c.last_seen < cutoff,
            ~exists().where(leases.c.holder == holders.c.id),
        )
    )
