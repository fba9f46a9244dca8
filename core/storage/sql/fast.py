"""PostgreSQL's hot paths: single statements in autocommit, each carrying every call that came
with it.

- acquire (no session; no filter, or one that SQL decides alone): a data-modifying CTE picks up
  to as many upstreams as there are callers (`FOR UPDATE SKIP LOCKED`), shares the callers out
  among them as far as each one's room under its limit allows (one upstream may take several
  leases of the batch, in the order repeated single acquires would give them), bumps them and
  inserts one lease per caller; the same statement says whether the pool exists with the
  selector this process believes it has, whether any upstream could ever match and whether
  one is free now, so that "all busy" costs one round trip too. Free upstreams that were all
  locked (being leased or given back by statements in flight) are not "busy": the next
  statement waits for the first of them instead of sending callers to wait in line.
- release: delete the leases and count each off its upstream.
- renew: move the expiry of a held lease (off the hot path of plain leases: one at a time).

Acquires of one pool, selector and filter made in the same event-loop turn go out as one
statement, and so do releases (`batching.Coalescer`): with synchronous commit, waiting for the
commit record to reach the disk is most of what a call costs, and one commit can carry every
caller's work. While acquires are on their way, releases wait for them and ride along in the
next acquire statement (its `_releases` part), so that under load one statement, one commit and
one round of row locks serve both; with no acquire coming, releases go alone at once. A caller
alone is not delayed. A statement is atomic: it does all its callers' work or none, and a
failure reaches each of them as their own would have. While requests of one kind keep coming
faster than a statement answers, the statements also lease ahead for the requests to come,
which take those leases without waiting (`ahead`: unlimited upstreams only, for a moment).

Locks: a release takes its leases in id order, then their upstreams in key order, the order
every transaction that waits for locks here takes (leases before upstreams, each sorted), so
batches cannot deadlock with each other or with the sweep; acquire waits for a lock only
while it holds none (one row, when every free one was locked). A
deadlock with anything else (a catalog change) is retried: the failed statement changed nothing.

When a fast path cannot decide (a pool this process has not seen yet, or whose selector
changed; a session lease parted from its session), it says so and the adapter runs the full
transaction. The statements are SQLAlchemy Core, compiled once by the engine's dialect; they
run on driver connections the engine lends for as long as the storage is open (`Lanes`),
which spares each call the engine's per-execution machinery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from enum import Enum
from functools import partial
from typing import Any, Literal, NamedTuple

from asyncpg.exceptions import DeadlockDetectedError
from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    Select,
    Subquery,
    Text,
    any_,
    bindparam,
    case,
    column,
    delete,
    exists,
    false,
    func,
    literal,
    null,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy import Sequence as SQLSequence
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from core.errors import NoUpstreamAvailable
from core.filters import Filter
from core.models import Lease, LeaseRequest, Pool, Selector
from core.storage.sql.ahead import MOST, Stock, Stocks
from core.storage.sql.batching import Coalescer
from core.storage.sql.filters import to_sql
from core.storage.sql.lanes import Lanes
from core.storage.sql.rows import upstream_from_row
from core.storage.sql.statements import ACTIVE, LIVE, Flavor, candidates, pick_select
from core.storage.sql.tables import LEASE_TICK, UNLIMITED, leases, pools, upstreams

__all__ = ["Compiled", "FastPaths", "verdict"]

log = logging.getLogger(__name__)

u = upstreams.c
_POSTGRES = Flavor(postgres=True)
#: Parameters the fast statements take from their callers are named `p_...`; SQLAlchemy's own
#: (a literal's value, say) keep the value they were compiled with.
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
_UPSTREAM_COLUMNS = tuple(column.name for column in upstreams.c)
#: The leases' id sequence (PostgreSQL's name for a serial key's).
_LEASE_ID = SQLSequence("leases_id_seq")
#: Callers served by one statement at most; more wait for the next.
MAX_BATCH = 64
#: Statements of one kind out at once: the next batch gathers while one is out.
IN_FLIGHT = 1
#: Seconds a release nobody waits for waits for an acquire statement to ride along with, when
#: none is on its way: alone it would be a statement, a commit and a round of row locks of its
#: own, which the next acquire statement would wait for.
RELEASE_LINGER = 0.002
#: Seconds before leases held ahead that could not be given back are tried again.
GIVE_BACK_RETRY = 1.0
#: Seconds between looks for leases on their way to the stock, while it is emptied.
_ARRIVING = 0.005
#: Times a statement that lost a deadlock is tried again.
DEADLOCK_RETRIES = 3
#: Distinct filters whose statements and batches are kept.
_KEPT_FILTERS = 256


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


def _acquire_statement(
    selector: Selector,
    *,
    guarded: bool,
    filtered: Any,
    many: bool,
    wait: bool = False,
    releasing: bool = False,
) -> Select[Any]:
    """Pick, bump and lease in one statement: with `many`, for every caller (parameters p_pool,
    p_selector, p_count, and one array each of p_consumers, p_holders, p_nows, p_expires),
    otherwise for one (p_pool, p_selector, p_consumer, p_holder, p_now, p_expires), which
    spares a caller alone the arrays' unpacking.

    Callers are served in their order, as many as the picked upstreams have room for (an
    upstream may take several, `_slots`). The leases come back as one array of rows, each with
    its caller's number; the one caller's, as columns. With `wait` (one caller), the pick waits
    for locked rows instead of passing over them. With `releasing` (`many` only), the statement
    also releases the leases `p_leases` (`_releases`) and says which it released, so that
    releases waiting for their own statement share the acquires' commit.

    The flags row says whether the pool is as this process believes, whether any upstream
    could ever match, and whether one is free now (by the statement's snapshot, locks aside):
    nothing granted while one is free means every free one was locked by other statements."""
    pool = bindparam("p_pool", type_=Text)
    guard = exists().where(pools.c.name == pool)
    if guarded:  # the pool's own selector: check this process still has it right
        guard = guard.where(pools.c.selector == bindparam("p_selector"))
    limit = bindparam("p_count", type_=Integer) if many else 1
    chosen = pick_select(pool, selector, _POSTGRES, filtered, limit, wait=wait).where(guard)
    freed = gone = None
    if releasing:
        gone, freed, freeing = _releases()
        # The released upstreams are locked first, as a release alone locks them: the pick
        # after them never waits, so the lock order stays the one every statement keeps.
        chosen = chosen.where(select(func.count()).select_from(freeing).scalar_subquery() >= 0)
    lease = _lease_many(pool, chosen, selector, freed) if many else _lease_one(pool, chosen)
    could = exists().where(u.pool == pool, u.status == ACTIVE, LIVE)
    if filtered is not None:
        could = could.where(filtered)
    free = candidates(pool, selector, filtered).with_only_columns(u.key).exists()
    flags = select(guard.label("pool_ok"), could.label("could_match"), free.label("free")).subquery(
        "flags"
    )
    joined = flags.outerjoin(lease, true())
    if not many:
        # One row always: the flags, and the lease's columns (NULL when nothing was granted).
        return select(flags, lease).select_from(joined)
    # The leases as one array of (n, lease id, upstream columns...) rows: one aggregate, not
    # one per column.
    rows = func.array_agg(
        tuple_(lease.c.n, lease.c.lease_id, *(lease.c[name] for name in _UPSTREAM_COLUMNS))
    ).filter(lease.c.lease_id.is_not(None))
    columns = [flags.c.pool_ok, flags.c.could_match, flags.c.free, rows.label("granted")]
    if gone is not None:
        released = select(func.array_agg(gone.c.id)).scalar_subquery()
        columns.append(released.label("released"))
    # One row always: the flags, and the leases (NULL when nothing was granted).
    return (
        select(*columns)
        .select_from(joined)
        .group_by(flags.c.pool_ok, flags.c.could_match, flags.c.free)
    )


def _deleted_leases() -> Any:
    """The leases `p_leases` deleted, locked first in id order: their ids and upstream keys."""
    doomed = (
        select(leases.c.id)
        .where(leases.c.id == any_(bindparam("p_leases", type_=ARRAY(BigInteger))))
        .order_by(leases.c.id)
        .with_for_update()
        .cte("doomed")
    )
    return (
        delete(leases)
        .where(leases.c.id == doomed.c.id)
        .returning(leases.c.id, leases.c.upstream_key)
        .cte("gone")
    )


def _releases() -> tuple[Any, Any, Any]:
    """Release the leases `p_leases`, as `_release_statement` does: the leases deleted (`gone`),
    how many each upstream lost (`freed`: key, n), and those upstreams locked in key order
    (`freeing`). The counts come off the upstreams in the acquire's bump."""
    gone = _deleted_leases()
    freed = (
        select(gone.c.upstream_key.label("key"), func.count().label("n"))
        .group_by(gone.c.upstream_key)
        .cte("freed")
    )
    freeing = (
        select(u.key)
        .join_from(upstreams, freed, u.key == freed.c.key)
        .order_by(u.key)
        .with_for_update(of=upstreams)
        .cte("freeing")
    )
    return gone, freed, freeing


def _lease_one(pool: Any, chosen: Select[Any]) -> Subquery:
    """The one caller's lease on the picked upstream: its columns after the bump, `n` (1) and
    `lease_id`."""
    pick = chosen.with_only_columns(u.key, literal(1, BigInteger).label("n")).cte("pick")
    bump = (
        update(upstreams)
        .where(u.key == pick.c.key)
        .values(
            active=u.active + 1,
            total_leases=u.total_leases + 1,
            last_leased=LEASE_TICK.next_value(),
        )
        .returning(*upstreams.c, pick.c.n)
        .cte("bump")
    )
    caller = (
        bindparam("p_consumer", type_=Text),
        bindparam("p_now", type_=Float),
        bindparam("p_expires", type_=Float),
        bindparam("p_holder", type_=Text),
    )
    rows = select(
        bump.c.key, pool, caller[0], null(), false(), caller[1], caller[2], caller[3], null(),
        literal(1),
    )  # fmt: skip
    granted = (
        leases.insert()
        .from_select(_GRANTED_COLUMNS, rows)
        .returning(leases.c.id, leases.c.upstream_key)
        .cte("granted")
    )
    return (
        select(bump, granted.c.id.label("lease_id"))
        .join_from(bump, granted, granted.c.upstream_key == bump.c.key)
        .subquery("lease")
    )


def _lease_many(pool: Any, chosen: Select[Any], selector: Selector, freed: Any) -> Subquery:
    """Every caller's lease that the picked upstreams have room for: each lease's upstream
    columns after the bump, its caller's number `n` and `lease_id`.

    Lease ids are drawn before the insert, so that each caller knows its own even when one
    upstream takes several leases of the batch. With `freed` (key, n), the bump also counts
    released leases off their upstreams: one UPDATE per row, as a statement must."""
    count = bindparam("p_count", type_=Integer)
    # Ranked after the lock: a window function cannot share a level with FOR UPDATE.
    locked = chosen.with_only_columns(u.key, u.active, (u.lim - u.active).label("room"))
    ranked = locked.subquery("chosen")
    pick = select(
        ranked.c.key, ranked.c.active, ranked.c.room, func.row_number().over().label("r")
    ).cte("pick")
    slots = _slots(pick, count, selector)
    assigned = (
        select(slots.c.key, slots.c.n, _LEASE_ID.next_value().label("lease_id"))
        .where(slots.c.n <= count)
        .cte("assigned")
    )
    counts = (
        select(assigned.c.key, func.count().label("taken")).group_by(assigned.c.key).cte("counts")
    )
    bump = _bump(counts) if freed is None else _bump_and_uncount(counts, freed)
    asks = (
        func.unnest(
            bindparam("p_consumers", type_=ARRAY(Text)),
            bindparam("p_holders", type_=ARRAY(Text)),
            bindparam("p_nows", type_=ARRAY(Float)),
            bindparam("p_expires", type_=ARRAY(Float)),
        )
        .table_valued(
            column("consumer", Text),
            column("holder", Text),
            column("now", Float),
            column("expires_at", Float),
            with_ordinality="n",
        )
        .render_derived(name="asks")
    )
    rows = select(
        assigned.c.lease_id, assigned.c.key, pool, asks.c.consumer, null(), false(),
        asks.c.now, asks.c.expires_at, asks.c.holder, null(), literal(1),
    ).join_from(assigned, asks, asks.c.n == assigned.c.n)  # fmt: skip
    granted = (
        leases.insert()
        .from_select(["id", *_GRANTED_COLUMNS], rows)
        .returning(leases.c.id)
        .cte("granted")
    )
    return (
        select(bump, assigned.c.n, assigned.c.lease_id)
        .join_from(bump, assigned, assigned.c.key == bump.c.key)
        .join(granted, granted.c.id == assigned.c.lease_id)
        .subquery("lease")
    )


def _bump(counts: Any) -> Any:
    """Count the batch's leases (`counts`: key, taken) on their upstreams."""
    return (
        update(upstreams)
        .where(u.key == counts.c.key)
        .values(
            active=u.active + counts.c.taken,
            total_leases=u.total_leases + counts.c.taken,
            last_leased=LEASE_TICK.next_value(),
        )
        .returning(*upstreams.c)
        .cte("bump")
    )


def _bump_and_uncount(counts: Any, freed: Any) -> Any:
    """`_bump`, and the released leases (`freed`: key, n) counted off their upstreams."""
    taken = func.coalesce(counts.c.taken, 0)
    delta = (
        select(
            func.coalesce(counts.c.key, freed.c.key).label("key"),
            taken.label("taken"),
            func.coalesce(freed.c.n, 0).label("freed"),
        )
        .select_from(counts.join(freed, counts.c.key == freed.c.key, full=True))
        .cte("delta")
    )
    return (
        update(upstreams)
        .where(u.key == delta.c.key)
        .values(
            active=u.active + delta.c.taken - delta.c.freed,
            total_leases=u.total_leases + delta.c.taken,
            last_leased=case((delta.c.taken > 0, LEASE_TICK.next_value()), else_=u.last_leased),
        )
        .returning(*upstreams.c)
        .cte("bump")
    )


def _slots(pick: Any, count: Any, selector: Selector) -> Any:
    """Places for leases on the picked upstreams, numbered `n` in the order callers take them:
    the j-th lease of the batch on an upstream is a place of its own, the upstream's room (its
    limit less its leases) permitting.

    The order is what repeated single acquires would do: rotating selectors (round robin,
    random, weighted) go once round the picked upstreams before any takes a second lease;
    least used fills the emptiest first; first available and lowest latency fill the first
    upstream before the next."""
    series = (
        func.generate_series(1, func.least(pick.c.room, count))
        .table_valued(column("j", BigInteger))
        .render_derived(name="series")
    )
    order = _slot_order(pick, series.c.j, selector)
    return (
        select(pick.c.key, func.row_number().over(order_by=order).label("n"))
        .select_from(pick)
        .join(series, true())
        .cte("slots")
    )


def _slot_order(pick: Any, j: Any, selector: Selector) -> list[Any]:
    if selector is Selector.LEAST_USED:
        return [pick.c.active + j, pick.c.r]
    if selector in (Selector.FIRST_AVAILABLE, Selector.LOWEST_LATENCY):
        return [pick.c.r, j]
    return [j, pick.c.r]


_gone = (
    delete(leases)
    .where(leases.c.id == bindparam("p_lease"))
    .returning(leases.c.upstream_key)
    .cte("gone")
)
#: One lease (`p_lease`): what a caller alone sends, cheaper than the batch's sorting locks.
_RELEASE_ONE = (
    update(upstreams)
    .where(u.key == _gone.c.upstream_key)
    .values(active=u.active - 1)
    .returning(u.key)
)


def _release_statement() -> Select[Any]:
    """Delete the leases `p_leases` and count each off its upstream; the ids deleted."""
    gone = _deleted_leases()
    counts = (
        select(gone.c.upstream_key, func.count().label("n"))
        .group_by(gone.c.upstream_key)
        .cte("counts")
    )
    locked = (
        select(u.key, counts.c.n)
        .join_from(upstreams, counts, u.key == counts.c.upstream_key)
        .order_by(u.key)
        .with_for_update(of=upstreams)
        .cte("locked")
    )
    counted = (
        update(upstreams)
        .where(u.key == locked.c.key)
        .values(active=u.active - locked.c.n)
        .returning(u.key)
        .cte("counted")
    )
    # A data-modifying CTE runs to completion whether or not the outer query reads it.
    return select(func.array_agg(gone.c.id).label("released")).add_cte(counted)


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


class _Verdict(Enum):
    """What an acquire that got no lease tells its caller."""

    BUSY = "every match is leased to its limit, or locked by another acquire"
    UNDECIDED = "the full transaction must decide"
    NO_MATCH = "no active upstream matches the filters"


class _Ask(NamedTuple):
    pool: str
    consumer: str
    holder: str
    now: float
    expires_at: float | None


_Outcome = Lease | _Verdict
_AcquireKey = tuple[str, Selector, bool, Filter | None]


class FastPaths:
    def __init__(self, lanes: Lanes, dialect: Dialect, *, lease_ahead: int = MOST) -> None:
        """`lease_ahead`: leases held ahead for one kind of request at most (`ahead`; 0 for
        none)."""
        self._lanes = lanes
        self._dialect = dialect
        #: Each pool's selector as this process last read it (the statement checks it).
        self._selectors: dict[str, Selector] = {}
        self._statements: dict[tuple[Selector, bool, Filter | None, bool, bool, bool], Compiled]
        self._statements = {}
        self._acquirers: dict[_AcquireKey, Coalescer[_Ask, _Outcome]] = {}
        # While acquires are on their way, releases wait to ride along with them.
        self._releaser: Coalescer[int, bool] = Coalescer(
            self._release_batch, in_flight=IN_FLIGHT, max_batch=MAX_BATCH, hold=self._holding
        )
        self._linger: asyncio.TimerHandle | None = None
        self._stocks = Stocks(self.give_back, most=lease_ahead)
        #: Releases of leases held ahead, until they are written.
        self._giving_back: set[asyncio.Future[bool]] = set()
        #: Leases held ahead whose release failed (the database away), tried again later.
        self._owed: list[Lease] = []
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        #: Upstreams with a concurrency limit, as the last statement that leased them said.
        self._limited: set[str] = set()
        self._release = Compiled(_release_statement(), dialect)
        self._release_one = Compiled(_RELEASE_ONE, dialect)
        self._renew = Compiled(_RENEW, dialect)

    async def warm_up(self) -> None:
        """Open a lane and prepare the statements every gateway runs (round robin, release,
        renew) on it, so the first requests do not pay for connecting and planning."""
        for many, wait in ((False, False), (True, False), (False, True)):
            statement = self._statement(Selector.ROUND_ROBIN, True, None, many=many, wait=wait)
            await self._fetch(statement, _acquire_params("", Selector.ROUND_ROBIN, [], many=many))
        await self._release_batch([])
        await self._release_batch([0])
        await self.renew(0, None)

    def handles(self, request: LeaseRequest) -> bool:
        return request.session is None

    def remember(self, pool: Pool) -> None:
        self._selectors[pool.name] = pool.selector

    def forget(self, name: str) -> None:
        """The pool changed (or went): its selector is read again, its leases held ahead go."""
        self._selectors.pop(name, None)
        self._stocks.give_back(lambda lease: lease.pool == name)
        self._stocks.reset(lambda key: key[0] == name)

    def forget_upstream(self, upstream_id: str) -> None:
        """The upstream was ejected, changed or removed: its leases held ahead go."""
        self._stocks.give_back(lambda lease: lease.upstream.id == upstream_id)

    def held_ahead(self) -> set[str]:
        """The ids of the leases held ahead, or owed back to the database."""
        return {lease.id for lease in (*self._stocks.leases(), *self._owed)}

    async def give_back_ahead(self) -> None:
        """Give back every lease held ahead and wait until the database has them (before a
        pool is removed)."""
        self._stocks.give_back()
        while self._giving_back or self._stocks.asking:
            if self._giving_back:
                await asyncio.wait(list(self._giving_back))
            else:  # asked for before: they go back as they arrive
                await asyncio.sleep(_ARRIVING)

    async def close(self) -> None:
        """Give back every lease held ahead, as far as the database answers: what it does not
        take stays held by this process until a sweep finds the holder gone."""
        await self.give_back_ahead()
        self._closed = True
        self._stocks.forget()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    async def acquire(
        self, request: LeaseRequest, holder: str, now: float
    ) -> Lease | Literal[False] | None:
        """The lease, None when every match is busy, or False when this cannot decide."""
        pending = self.acquire_soon(request, holder, now)
        if pending is None:
            return False
        return verdict(request, await pending)

    def acquire_soon(
        self, request: LeaseRequest, holder: str, now: float
    ) -> asyncio.Future[_Outcome] | None:
        """The acquire sent with the next batch, answered through `verdict`; None when this
        cannot decide. A lease granted to a cancelled future is given back."""
        guarded = request.selector is None
        selector = request.selector or self._selectors.get(request.pool)
        if selector is None:
            return None
        filters = request.filters
        if filters is not None and not to_sql(filters).exact:
            return None
        key = (request.pool, selector, guarded, filters)
        acquirer = self._acquirers.get(key)
        if acquirer is None:
            acquirer = self._acquirer(key)
        expires_at = None if request.duration is None else now + request.duration
        ask = _Ask(request.pool, request.consumer, holder, now, expires_at)
        if expires_at is not None or not self._stocks.enabled:
            return acquirer.submit(ask)
        stock = self._stocks.stock(key, (request.consumer, holder))
        lease = self._stocks.take(stock)
        if lease is None:
            pending = acquirer.submit(ask)
        else:
            pending = self._stocks.loop.create_future()
            pending.set_result(lease)
        for _ in range(stock.wanted()):
            acquirer.submit(ask).add_done_callback(partial(self._stocked, stock))
        return pending

    def release(self, lease_id: int, *, linger: bool = False) -> asyncio.Future[bool]:
        """Whether the lease was released, once its batch ran (which it does even if nobody
        waits for the answer). With `linger` (nobody waits), a release may wait up to
        `RELEASE_LINGER` for an acquire statement to carry it, and so do the releases made
        meanwhile: they go together."""
        if linger and self._linger is None and not self._acquiring():
            self._linger = asyncio.get_running_loop().call_later(RELEASE_LINGER, self._linger_over)
        return self._releaser.submit(lease_id)

    async def renew(self, lease_id: int, expires_at: float | None) -> bool | None:
        """True if renewed; None when the full transaction must decide."""
        params = {"p_lease": lease_id, "p_expires": expires_at}
        row = await self._fetch(self._renew, params)
        return True if row is not None else None

    # -- batches ------------------------------------------------------------------------------

    def _acquirer(self, key: _AcquireKey) -> Coalescer[_Ask, _Outcome]:
        if len(self._acquirers) >= _KEPT_FILTERS:
            # Many pools or filters seen: keep the batches in use, forget the idle ones.
            self._acquirers = {k: c for k, c in self._acquirers.items() if c.busy}
            self._statements.clear()
            self._stocks.prune()

        async def run(asks: Sequence[_Ask]) -> list[_Outcome]:
            return await self._acquire_batch(key, asks)

        acquirer = Coalescer(run, in_flight=IN_FLIGHT, max_batch=MAX_BATCH, orphan=self._disown)
        self._acquirers[key] = acquirer
        return acquirer

    def _statement(
        self,
        selector: Selector,
        guarded: bool,
        filters: Filter | None,
        *,
        many: bool,
        wait: bool = False,
        releasing: bool = False,
    ) -> Compiled:
        key = (selector, guarded, filters, many, wait, releasing)
        statement = self._statements.get(key)
        if statement is None:
            clause = None if filters is None else to_sql(filters).clause
            built = _acquire_statement(
                selector,
                guarded=guarded,
                filtered=clause,
                many=many,
                wait=wait,
                releasing=releasing,
            )
            statement = self._statements[key] = Compiled(built, self._dialect)
        return statement

    async def _acquire_batch(self, key: _AcquireKey, asks: Sequence[_Ask]) -> list[_Outcome]:
        _, selector, guarded, filters = key
        try:
            return await self._acquire_rounds(selector, guarded, filters, asks)
        finally:
            self._stocks.answered(key)
            # After the batcher has sent its next batch, if any: that one takes the releases.
            asyncio.get_running_loop().call_soon(self._releaser.kick)

    async def _acquire_rounds(
        self,
        selector: Selector,
        guarded: bool,
        filters: Filter | None,
        asks: Sequence[_Ask],
    ) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        pending = list(asks)
        wait = False
        while pending:
            # Releases made meanwhile ride along, sharing the acquires' commit (in the batch
            # statement only: a waiting pick must not wait while the releases hold locks).
            riders = [] if wait else self._releaser.take()
            many = (len(pending) > 1 or bool(riders)) and not wait
            statement = self._statement(
                selector, guarded, filters, many=many, wait=wait, releasing=bool(riders)
            )
            served_now = pending if many else pending[:1]
            params = _acquire_params(pending[0].pool, selector, served_now, many=many)
            if riders:
                params["p_leases"] = [lease_id for lease_id, _ in riders]
            try:
                row = await self._fetch(statement, params)
            except BaseException as error:
                _settle_riders(riders, error, None)
                raise
            assert row is not None  # the statement always returns its flags row
            if riders:
                _settle_riders(riders, None, row["released"])
            granted = _granted(row, many=many)
            if not granted:
                if row["free"] and not wait:
                    # Free upstreams, all locked by statements in flight (releases, other
                    # acquires): "busy" would send the callers to wait in line and poll, for
                    # what a lock wait of one commit gives. The next statement waits for one.
                    wait = True
                    continue
                outcomes.extend([_empty_verdict(row, filters)] * len(pending))
                break
            wait = False
            # The callers numbered 1..len(granted) are served (in no particular order in the
            # array); when fewer upstreams were free than callers asked (or the pool is
            # smaller than the batch), the others try again at once, first in line.
            served: list[Lease | None] = [None] * len(granted)
            for n, lease_id, *columns in granted:
                ask = pending[n - 1]
                values = dict(zip(_UPSTREAM_COLUMNS, columns, strict=True))
                upstream = upstream_from_row(values)
                if values["lim"] < UNLIMITED:
                    self._limited.add(upstream.id)
                else:
                    self._limited.discard(upstream.id)
                served[n - 1] = Lease(
                    str(lease_id),
                    upstream,
                    ask.pool,
                    ask.consumer,
                    None,
                    ask.now,
                    ask.expires_at,
                    ask.holder,
                )
            outcomes.extend(lease for lease in served if lease is not None)
            pending = pending[len(granted) :]
        return outcomes

    async def _release_batch(self, lease_ids: Sequence[int]) -> list[bool]:
        if len(lease_ids) == 1:
            one = await self._fetch(self._release_one, {"p_lease": lease_ids[0]})
            return [one is not None]
        row = await self._fetch(self._release, {"p_leases": list(lease_ids)})
        return _answers(lease_ids, row["released"] if row is not None else None)

    def _acquiring(self) -> bool:
        return any(acquirer.busy for acquirer in self._acquirers.values())

    def _holding(self) -> bool:
        return self._linger is not None or self._acquiring()

    def _linger_over(self) -> None:
        self._linger = None
        self._releaser.kick()

    def _disown(self, outcome: _Outcome) -> None:
        """A lease granted to an acquire cancelled meanwhile: given back as one held ahead is,
        tried again until the database takes it."""
        if isinstance(outcome, Lease):
            self.give_back(outcome)

    def _stocked(self, stock: Stock, asked: asyncio.Future[_Outcome]) -> None:
        outcome = None if asked.cancelled() or asked.exception() else asked.result()
        if isinstance(outcome, Lease):
            self._stocks.put(stock, outcome, limited=outcome.upstream.id in self._limited)
        else:
            self._stocks.missed(stock)

    def give_back(self, lease: Lease) -> None:
        """Release a lease nobody uses, without waiting: tried again until the database takes
        it, however long it is unavailable (while this process runs)."""
        released = self.release(int(lease.id), linger=True)
        self._giving_back.add(released)
        released.add_done_callback(partial(self._given_back, lease))

    def _given_back(self, lease: Lease, released: asyncio.Future[bool]) -> None:
        self._giving_back.discard(released)
        if self._closed:
            return
        # Cut off before it answered (cancelled), or failed: still held by this process in
        # the database, so kept and tried again, as the lease manager keeps a release it
        # could not write.
        error = "cut off" if released.cancelled() else released.exception()
        if error is None:
            return
        if not self._owed:
            log.warning("could not give back leases granted here (trying again): %s", error)
        self._owed.append(lease)
        if self._retry is None:
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(GIVE_BACK_RETRY, self._give_back_owed)

    def _give_back_owed(self) -> None:
        self._retry = None
        owed, self._owed = self._owed, []
        for lease in owed:
            self.give_back(lease)

    async def _fetch(self, statement: Compiled, params: dict[str, Any]) -> Any:
        args = statement.args(params)
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                return await self._lanes.fetchrow(statement.sql, args)
            except DeadlockDetectedError:
                if attempt == DEADLOCK_RETRIES:
                    raise
        raise AssertionError("unreachable")


def verdict(request: LeaseRequest, outcome: _Outcome) -> Lease | Literal[False] | None:
    """What an acquire's outcome means to its caller: the lease, None when every match is
    busy, or False when the fast path could not decide."""
    if isinstance(outcome, Lease):
        return outcome
    if outcome is _Verdict.BUSY:
        return None
    if outcome is _Verdict.NO_MATCH:
        raise NoUpstreamAvailable(request.pool, waited=0.0, reason=outcome.value)
    return False


def _answers(lease_ids: Sequence[int], released: Sequence[int] | None) -> list[bool]:
    """Whether each of `lease_ids` was released, by the ids a statement released."""
    gone = set(released or ())
    answers = []
    for lease_id in lease_ids:
        answers.append(lease_id in gone)
        gone.discard(lease_id)  # the same lease twice in a batch: released once
    return answers


def _settle_riders(
    riders: list[tuple[int, asyncio.Future[bool]]],
    error: BaseException | None,
    released: Sequence[int] | None,
) -> None:
    """Answer the releases an acquire statement carried, as their own statement would have."""
    answers = _answers([lease_id for lease_id, _ in riders], released)
    for (_, future), answer in zip(riders, answers, strict=True):
        if future.done():
            continue
        if error is None:
            future.set_result(answer)
        elif isinstance(error, Exception):
            future.set_exception(error)
        else:
            future.cancel()


def _granted(row: Any, *, many: bool) -> list[Any]:
    """The (n, lease id, upstream columns...) rows of what an acquire statement granted."""
    if many:
        return row["granted"] or []
    if row["lease_id"] is None:
        return []
    return [(row["n"], row["lease_id"], *(row[name] for name in _UPSTREAM_COLUMNS))]


def _acquire_params(
    pool: str, selector: Selector, asks: Sequence[_Ask], *, many: bool
) -> dict[str, Any]:
    params: dict[str, Any] = {"p_pool": pool, "p_selector": selector.value}
    if not many:
        (ask,) = asks or (_Ask(pool, "", "", 0.0, None),)
        return params | {
            "p_consumer": ask.consumer,
            "p_holder": ask.holder,
            "p_now": ask.now,
            "p_expires": ask.expires_at,
        }
    return params | {
        "p_count": len(asks),
        "p_consumers": [ask.consumer for ask in asks],
        "p_holders": [ask.holder for ask in asks],
        "p_nows": [ask.now for ask in asks],
        "p_expires": [ask.expires_at for ask in asks],
    }


def _empty_verdict(row: Any, filters: Filter | None) -> _Verdict:
    """Why a statement granted nothing."""
    if not row["pool_ok"]:
        return _Verdict.UNDECIDED
    if not row["could_match"]:
        # Unfiltered, the full path tells "ejected" from "no upstreams".
        return _Verdict.UNDECIDED if filters is None else _Verdict.NO_MATCH
    return _Verdict.BUSY
