"""Leases granted ahead of the requests that will take them (PostgreSQL's fast paths).

Under load an acquire waits for two statements: the one out when it came, then its own, and
most of each is the commit's wait for the disk. So while requests of one kind (pool,
selector, filters, consumer, holder) keep coming faster than one statement answers, each
request that takes a lease asks for one more: the statement in flight carries those asks with
the requests' own, and the next requests take the leases it brought at once, in the order the
database granted them (the selector's order). The stock is sized to three times the requests
that came while the last statement was out (a lease asked for now comes with the statement
after the one out), and with no more than one request per statement there is none: a caller
alone, or a few now and then, are served as before.

Every lease held ahead is a lease in the database: counted against its upstream, held by this
process, reaped with its holder's, shown in the stats. What that costs is bounded:

- only upstreams without a concurrency limit are held ahead (where a limit makes room scarce,
  a lease nobody uses would keep other processes out): a lease on a limited upstream is given
  back at once and its kind asks for no more;
- a kind holds at most `MOST`, and a lease waits at most `TTL` seconds to be taken, then is
  given back (a release that fails, the database away, is tried again later);
- an upstream this process ejects, removes or changes, and a pool it changes, lose their
  leases held ahead at once (another process's changes reach them within `TTL`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from core.models import Lease

__all__ = ["MOST", "TTL", "Stock", "Stocks"]

#: Leases held ahead for one kind of request, at most.
MOST = 64
#: Seconds a lease held ahead waits to be taken before it is given back.
TTL = 0.05


class Stock:
    """The leases held ahead for one kind of request, oldest first."""

    __slots__ = ("asked", "demand", "leases", "limited", "target")

    def __init__(self) -> None:
        #: (lease, when it was stocked), in the order the database granted them.
        self.leases: deque[tuple[Lease, float]] = deque()
        #: Leases asked for and not yet answered.
        self.asked = 0
        #: Requests since the last statement of this kind was answered.
        self.demand = 0
        #: How many to hold (`Stocks.answered`).
        self.target = 0
        #: A lease of this kind came from a limited upstream: hold none.
        self.limited = False

    def wanted(self) -> int:
        """How many more to ask for now (counted as asked)."""
        missing = self.target - len(self.leases) - self.asked
        if missing <= 0 or self.limited:
            return 0
        self.asked += missing
        return missing


class Stocks:
    """Every kind's stock, grouped by the statements that serve them (one per pool,
    selector and filters; a kind adds the consumer and the holder). `release(lease)` gives a
    lease back to the database without waiting."""

    def __init__(self, release: Callable[[Lease], Any], *, most: int = MOST) -> None:
        self._release = release
        self._most = most
        self._ttl = TTL
        self._groups: dict[Hashable, dict[Hashable, Stock]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: (which leases, until when): leases given back lately, and those still on their way
        #: from a statement sent before, go back as they arrive.
        self._bars: list[tuple[Callable[[Lease], bool] | None, float]] = []

    @property
    def enabled(self) -> bool:
        return self._most > 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once: each request takes from here, and each lookup
        of the running loop is a system call."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @property
    def asking(self) -> bool:
        """Leases asked for ahead are on their way."""
        return any(stock.asked for stock in self._all())

    def stock(self, group: Hashable, kind: Hashable) -> Stock:
        stocks = self._groups.get(group)
        if stocks is None:
            stocks = self._groups[group] = {}
        stock = stocks.get(kind)
        if stock is None:
            stock = stocks[kind] = Stock()
        return stock

    def take(self, stock: Stock) -> Lease | None:
        """A request of `stock`'s kind: the oldest lease still fresh, or None. Stale ones on
        the way are given back."""
        stock.demand += 1
        leases = stock.leases
        if not leases:
            return None
        oldest = self.loop.time() - self._ttl
        while leases:
            lease, stocked_at = leases.popleft()
            if stocked_at >= oldest:
                return lease
            self._release(lease)
        return None

    def answered(self, group: Hashable) -> None:
        """A statement of `group` came back: each of its kinds holds about as many as came
        while it was out (none when no more than one did)."""
        for stock in self._groups.get(group, {}).values():
            demand, stock.demand = stock.demand, 0
            # Three round trips' worth: a lease asked for now comes with the statement after
            # the one out, and the stock must last until then. Halved, not dropped, after a
            # quiet round trip: one short statement among long ones must not empty it.
            wanted = 3 * demand if demand > 1 else 0
            stock.target = min(self._most, max(wanted, stock.target // 2))

    def put(self, stock: Stock, lease: Lease, *, limited: bool) -> None:
        """A lease asked for ahead arrived."""
        stock.asked -= 1
        if limited:
            stock.limited = True
        loop = self.loop
        now = loop.time()
        if stock.limited or self._barred(lease, now):
            self._release(lease)
            return
        stock.leases.append((lease, now))
        if self._expiry is None:
            self._expiry = loop.call_later(self._ttl, self._expire)

    def missed(self, stock: Stock) -> None:
        """A lease asked for ahead did not come (all busy, or the statement failed)."""
        stock.asked -= 1

    def give_back(self, doomed: Callable[[Lease], bool] | None = None) -> None:
        """Give back the leases held ahead (those `doomed` says, or all), and those that
        arrive within `TTL` (asked for before)."""
        if self.asking:
            self._bars.append((doomed, self.loop.time() + self._ttl))
        for stock in self._all():
            kept: deque[tuple[Lease, float]] = deque()
            for lease, stocked_at in stock.leases:
                if doomed is None or doomed(lease):
                    self._release(lease)
                else:
                    kept.append((lease, stocked_at))
            stock.leases = kept

    def reset(self, groups: Callable[[Any], bool]) -> None:
        """Those groups' pools changed: their kinds start over (a limit may be gone)."""
        for group, stocks in self._groups.items():
            if groups(group):
                for stock in stocks.values():
                    stock.target = 0
                    stock.limited = False

    def prune(self) -> None:
        """Forget the kinds that hold and await nothing."""
        for group, stocks in list(self._groups.items()):
            kept = {kind: stock for kind, stock in stocks.items() if stock.leases or stock.asked}
            if kept:
                self._groups[group] = kept
            else:
                del self._groups[group]

    def forget(self) -> None:
        """Give back everything and forget every kind (the storage closes)."""
        self.give_back()
        self._groups.clear()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _barred(self, lease: Lease, now: float) -> bool:
        if self._bars:
            self._bars = [(doomed, until) for doomed, until in self._bars if until > now]
        return any(doomed is None or doomed(lease) for doomed, _ in self._bars)

    def _expire(self) -> None:
        self._expiry = None
        loop = self.loop
        oldest = loop.time() - self._ttl
        left = False
        for stock in self._all():
            leases = stock.leases
            while leases and leases[0][1] < oldest:
                self._release(leases.popleft()[0])
            left = left or bool(leases)
        if left:
            self._expiry = loop.call_later(self._ttl, self._expire)

    def leases(self) -> Iterator[Lease]:
        """Every lease held in a stock."""
        for stock in self._all():
            for lease, _ in stock.leases:
                yield lease

    def _all(self) -> Iterator[Stock]:
        for stocks in self._groups.values():
            yield from stocks.values()
