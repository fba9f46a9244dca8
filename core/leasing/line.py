"""The waiting line: acquirers of a pool whose upstreams are all busy, in arrival order.

A release hands its capacity straight to the first waiter that can use it, so newcomers never
overtake the line. On a storage other processes share, releases happen there without a word
here: the head of the line also tries now and then (`poll_interval`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress

from core.clock import Clock
from core.errors import CoreError, NoUpstreamAvailable
from core.models import Lease, LeaseRequest
from core.storage.interface import Storage

__all__ = ["WaitingLine"]


class _Waiter:
    __slots__ = ("future", "request", "serving")

    def __init__(self, request: LeaseRequest, future: asyncio.Future[Lease]) -> None:
        self.request = request
        self.future = future
        self.serving = False


class WaitingLine:
    def __init__(
        self,
        storage: Storage,
        holder: str,
        clock: Callable[[], Clock],
        poll_interval: float,
        release: Callable[[Lease], Awaitable[bool]],
        return_grant: Callable[[Lease], Awaitable[None]],
    ) -> None:
        """`release` ends a lease handed over to a waiter that left; `return_grant` gives back
        a grant made for one that gave up meanwhile."""
        self._storage = storage
        self._holder = holder
        self._clock = clock
        self._poll_interval = poll_interval
        self._release = release
        self._return_grant = return_grant
        #: Who waits for each pool, in arrival order (the lease manager's private part reads
        #: it: while anyone waits for a pool, its leasing goes through the line).
        self.queues: dict[str, deque[_Waiter]] = {}
        # Hand-offs started from `notify` (ended at `close`).
        self._hand_offs: set[asyncio.Task[None]] = set()

    def waiting(self, pool: str) -> int:
        return len(self.queues.get(pool, ()))

    async def close(self) -> None:
        for hand_off in list(self._hand_offs):
            hand_off.cancel()
        if self._hand_offs:
            await asyncio.gather(*self._hand_offs, return_exceptions=True)

    def notify(self, pool: str) -> None:
        """Capacity may have appeared without a release (upstreams added or re-admitted)."""
        if self.queues.get(pool):
            task = asyncio.get_running_loop().create_task(
                self.hand_off(pool), name=f"handoff-{pool}"
            )
            self._hand_offs.add(task)
            task.add_done_callback(self._hand_offs.discard)

    async def wait(
        self, request: LeaseRequest, timeout: float, started: float, *, offer: bool
    ) -> Lease:
        """Join the line for `request` until a lease is handed over (or, on shared storage,
        found by polling at the head of the line), `timeout` seconds at most
        (NoUpstreamAvailable then). With `offer`, capacity is offered at once."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(request, loop.create_future())
        queue = self.queues.setdefault(request.pool, deque())
        queue.append(waiter)
        try:
            if offer:
                await self.hand_off(request.pool)
            async with asyncio.timeout(timeout):
                if not self._storage.shared:
                    return await waiter.future
                return await self._poll(waiter, queue)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()  # handed over just as time ran out
            raise NoUpstreamAvailable(
                request.pool,
                waited=time.perf_counter() - started,
                reason=f"every upstream stayed busy for {timeout:g}s",
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                handed = waiter.future.result()
                if handed.uses == 1:  # a session's shared lease is not ours to end
                    await self._release(handed)
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            with suppress(ValueError):
                queue.remove(waiter)
            if not queue and self.queues.get(request.pool) is queue:
                del self.queues[request.pool]

    async def _poll(self, waiter: _Waiter, queue: deque[_Waiter]) -> Lease:
        """Wait for a hand-over, and at the head of the line also try now and then: other
        processes release without telling us."""
        while True:
            await asyncio.wait((waiter.future,), timeout=self._poll_interval)
            if waiter.future.done():
                return waiter.future.result()
            if queue[0] is waiter and not waiter.serving:
                # Marked as served, so no hand-off leases for it at the same time.
                waiter.serving = True
                try:
                    lease = await self._storage.acquire(
                        waiter.request, holder=self._holder, now=self._clock().now()
                    )
                finally:
                    waiter.serving = False
                if lease is not None:
                    return lease

    async def hand_off(self, pool: str) -> None:
        """Offer freed capacity to the waiters of `pool` in arrival order; the first that can
        use it gets it."""
        queue = self.queues.get(pool)
        if not queue:
            return
        tried_unfiltered = False
        for waiter in list(queue):
            if waiter.future.done():
                continue
            unfiltered = waiter.request.filters is None and waiter.request.session is None
            if waiter.serving:
                # Another hand-off is leasing for it: those behind it must not overtake it.
                tried_unfiltered |= unfiltered
                continue
            if unfiltered and tried_unfiltered:
                continue  # an unfiltered waiter already found nothing: none will
            tried_unfiltered |= unfiltered
            waiter.serving = True
            try:
                lease = await self._storage.acquire(
                    waiter.request, holder=self._holder, now=self._clock().now()
                )
            except CoreError as exc:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
                continue
            finally:
                waiter.serving = False
            if lease is None:
                continue
            if waiter.future.done():  # it gave up while we were leasing for it
                if lease.uses == 1:
                    await self._return_grant(lease)
                continue
            waiter.future.set_result(lease)
            return
