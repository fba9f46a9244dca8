"""PostgreSQL's hot paths, each one statement in autocommit: one round trip per call.

- acquire (no session; no filter, or one that SQL decides alone): a data-modifying CTE picks
  the upstream (`FOR UPDATE SKIP LOCKED`), bumps it and inserts the lease; the same statement
  says whether the pool exists with the selector this process believes it has, and whether
  any upstream could ever match, so that "all busy" costs one round trip too.
- release: delete the lease and count it off its upstream.
- renew: move the expiry of a held lease.

A single statement is atomic on its own, and the row locks it takes last until it ends. When a
fast path cannot decide (a pool this process has not seen yet, or whose selector changed; a
session lease parted from its session), it says so and the adapter runs the full transaction.

The statements are SQLAlchemy Core, compiled once by the engine's dialect; they run on driver
connections the engine lends for as long as the storage is open (`Lanes`), which spares each
call the engine's per-execution machinery: most of the cost of a one-row statement.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import (
    Float,
    Select,
    Text,
    bindparam,
    delete,
    exists,
    false,
    literal,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from core.errors import NoUpstreamAvailable
from core.models import Lease, LeaseRequest, Pool, Selector
from core.storage.sql.filters import to_sql
from core.storage.sql.lanes import Lanes
from core.storage.sql.rows import upstream_from_row
from core.storage.sql.statements import ACTIVE, LIVE, Flavor, pick_select
from core.storage.sql.tables import LEASE_TICK, leases, pools, upstreams

__all__ = ["Compiled", "FastPaths"]

u = upstreams.c
_POSTGRES = Flavor(postgres=True)
#: Parameters the fast statements take from their callers are named `p_...`; SQLAlchemy's own
#: (a LIMIT's value, say) keep the value they were compiled with.
_EXPIRES = bindparam("p_expires", type_=Float)
_GRANTED_COLUMNS = [
    "upstream_key",
    "pool",
    "consumer",
    "session",
    "bound",
    "acquired_at",
    "expires_at",
    "holder",
    "idle_ttl",
    "uses",
]


class Compiled:
    """A Core statement compiled for the driver: its SQL text and how to order arguments."""

    __slots__ = ("_slots", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        names: list[str] = list(compiled.positiontup or ())
        ours = {name: None for name in names if name.startswith("p_")}
        fixed = compiled.construct_params(ours) or {}
        self.sql = compiled.string
        # (name, True) for a caller's parameter, (value, False) for a compiled-in one.
        self._slots: list[tuple[Any, bool]] = [
            (name, True) if name in ours else (fixed[name], False) for name in names
        ]

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[slot] if ours else slot for slot, ours in self._slots]


def _acquire_statement(selector: Selector, *, guarded: bool, filtered: Any) -> Select[Any]:
    """Pick, bump and lease in one statement (parameters p_pool, p_selector, p_consumer,
    p_holder, p_now, p_expires)."""
    pool = bindparam("p_pool", type_=Text)
    guard = exists().where(pools.c.name == pool)
    if guarded:  # the pool's own selector: check this process still has it right
        guard = guard.where(pools.c.selector == bindparam("p_selector"))
    pick = (
        pick_select(pool, selector, _POSTGRES, filtered, 1)
        .with_only_columns(u.key)
        .where(guard)
        .cte("pick")
    )
    bump = (
        update(upstreams)
        .where(u.key == pick.c.key)
        .values(
            active=u.active + 1,
            total_leases=u.total_leases + 1,
            last_leased=LEASE_TICK.next_value(),
        )
        .returning(*upstreams.c)
        .cte("bump")
    )
    granted = (
        leases.insert()
        .from_select(
            _GRANTED_COLUMNS,
            select(
                bump.c.key,
                pool,
                bindparam("p_consumer"),
                null(),
                false(),
                bindparam("p_now", type_=Float),
                _EXPIRES,
                bindparam("p_holder"),
                null(),
                literal(1),
            ),
        )
        .returning(leases.c.id, leases.c.upstream_key)
        .cte("granted")
    )
    matched = select(bump, granted.c.id.label("lease_id")).join_from(
        bump, granted, granted.c.upstream_key == bump.c.key
    )
    could = exists().where(u.pool == pool, u.status == ACTIVE, LIVE)
    if filtered is not None:
        could = could.where(filtered)
    flags = select(guard.label("pool_ok"), could.label("could_match")).subquery("flags")
    lease = matched.subquery("lease")
    # One row always: the flags, and the lease's columns (NULL when nothing was granted).
    return select(flags, lease).select_from(flags.outerjoin(lease, true()))


_gone = (
    delete(leases)
    .where(leases.c.id == bindparam("p_lease"))
    .returning(leases.c.upstream_key)
    .cte("gone")
)
_RELEASE = (
    update(upstreams)
    .where(u.key == _gone.c.upstream_key)
    .values(active=u.active - 1)
    .returning(u.key)
)
_RENEW = (
    update(leases)
    .where(
        leases.c.id == bindparam("p_lease"),
        # A session's lease its session has left is released by its last user's renew: that
        # takes the full transaction.
        or_(_EXPIRES.is_(None), leases.c.session.is_(None), leases.c.bound),
    )
    .values(expires_at=_EXPIRES)
    .returning(leases.c.id)
)


class FastPaths:
    def __init__(self, lanes: Lanes, dialect: Dialect) -> None:
        self._lanes = lanes
        self._dialect = dialect
        #: Each pool's selector as this process last read it (the statement checks it).
        self._selectors: dict[str, Selector] = {}
        self._acquires: dict[tuple[Selector, bool], Compiled] = {}
        self._release = Compiled(_RELEASE, dialect)
        self._renew = Compiled(_RENEW, dialect)

    async def warm_up(self) -> None:
        """Open a lane and prepare the statements every gateway runs (round robin, release,
        renew) on it, so the first requests do not pay for connecting and planning."""
        statement = self._acquire_for(Selector.ROUND_ROBIN, guarded=True)
        nowhere = {"p_pool": "", "p_selector": "", "p_consumer": "", "p_holder": ""}
        await self._lanes.fetchrow(
            statement.sql, statement.args(nowhere | {"p_now": 0.0, "p_expires": None})
        )
        await self.release(0)
        await self.renew(0, None)

    def _acquire_for(self, selector: Selector, *, guarded: bool) -> Compiled:
        statement = self._acquires.get((selector, guarded))
        if statement is None:
            statement = Compiled(
                _acquire_statement(selector, guarded=guarded, filtered=None), self._dialect
            )
            self._acquires[(selector, guarded)] = statement
        return statement

    def handles(self, request: LeaseRequest) -> bool:
        return request.session is None

    def remember(self, pool: Pool) -> None:
        self._selectors[pool.name] = pool.selector

    def forget(self, name: str) -> None:
        self._selectors.pop(name, None)

    async def acquire(
        self, request: LeaseRequest, holder: str, now: float
    ) -> Lease | Literal[False] | None:
        """The lease, None when every match is busy, or False when this cannot decide."""
        guarded = request.selector is None
        selector = request.selector or self._selectors.get(request.pool)
        if selector is None:
            return False
        if request.filters is None:
            statement = self._acquire_for(selector, guarded=guarded)
        else:
            sql = to_sql(request.filters)
            if not sql.exact:
                return False
            statement = Compiled(
                _acquire_statement(selector, guarded=guarded, filtered=sql.clause), self._dialect
            )
        expires_at = None if request.duration is None else now + request.duration
        params = {
            "p_pool": request.pool,
            "p_selector": selector.value,
            "p_consumer": request.consumer,
            "p_holder": holder,
            "p_now": now,
            "p_expires": expires_at,
        }
        row = await self._lanes.fetchrow(statement.sql, statement.args(params))
        assert row is not None  # the statement always returns its flags row
        if row["lease_id"] is None:
            if not row["pool_ok"]:
                return False
            if not row["could_match"]:
                if request.filters is None:
                    return False  # the full path tells "ejected" from "no upstreams"
                raise NoUpstreamAvailable(
                    request.pool, waited=0.0, reason="no active upstream matches the filters"
                )
            return None
        return Lease(
            str(row["lease_id"]),
            upstream_from_row(row),
            request.pool,
            request.consumer,
            None,
            now,
            expires_at,
            holder,
        )

    async def release(self, lease_id: int) -> bool:
        statement = self._release
        row = await self._lanes.fetchrow(statement.sql, statement.args({"p_lease": lease_id}))
        return row is not None

    async def renew(self, lease_id: int, expires_at: float | None) -> bool | None:
        """True if renewed; None when the full transaction must decide."""
        statement = self._renew
        params = {"p_lease": lease_id, "p_expires": expires_at}
        row = await self._lanes.fetchrow(statement.sql, statement.args(params))
        return True if row is not None else None
