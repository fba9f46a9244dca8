"""The lease manager's desk: leasing and giving back on the spot, without awaiting.

Every plain HTTP request the gateway carries from its callbacks leases and gives back here, so
this part of `core.leasing.LeaseManager` is a module of its own, compiled with the request path
(setup.py). It keeps the bookkeeping both halves share (the leases in use here, sessions'
users, the waiting lines, the callbacks, the writes kept for an unavailable storage); the
manager does everything that awaits, and works on the same objects.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from core.backlog import Backlog, LeaseWrite
from core.clock import Clock
from core.errors import StorageUnavailable
from core.models import Lease, LeaseRequest, Upstream
from core.storage.interface import ImmediateLeasing, PromptLeasing, Storage

__all__ = ["LeaseDesk"]

log = logging.getLogger("proxygate.leasing")


class LeaseDesk:
    def __init__(
        self,
        storage: Storage,
        clock: Clock,
        instance_id: str,
        on_storage_down: Callable[[StorageUnavailable], None],
    ) -> None:
        self.clock = clock
        self.instance_id = instance_id
        #: What a storage in this process's memory, or one answering many callers with one
        #: statement, offers for leasing without awaiting (None where it does not).
        self.immediate = _immediate(storage)
        self.prompt = _prompt(storage)
        self.double_releases = 0
        #: Waiters in line per pool (the manager's `_Waiter`s) and the lease callbacks: while
        #: there are any, leasing and giving back go through the manager.
        self.waiters: dict[str, deque[Any]] = {}
        self.on_acquire: list[Callable[[Any], None]] = []
        self.on_release: list[Callable[[Any], None]] = []
        #: Users of each session lease right now: it expires only once idle, not while in use.
        self.session_users: dict[str, int] = {}
        #: Session leases their session left (`unbind_session`): released by their last user.
        self.unbound: set[str] = set()
        #: Leases acquired here and not yet put back, and the upstream of every lease granted
        #: (what a traffic outcome kept for later is answered with).
        self.in_use: dict[str, Lease] = {}
        self.upstreams: dict[str, Upstream] = {}
        #: Leases in use here that other processes took back while the storage was away.
        self.lost: set[str] = set()
        #: Writes kept for an unavailable storage.
        self.backlog = Backlog()
        #: Releases sent without waiting (on a prompt storage), until answered: each one's
        #: answer and its lease.
        self.releasing: dict[asyncio.Future[bool], Lease] = {}
        self._on_storage_down = on_storage_down

    def acquire_now(self, request: LeaseRequest) -> Lease | None:
        """Lease without awaiting, when the storage can and nothing else needs to happen:
        nobody waiting in line, no callbacks, nothing kept for an unavailable storage. None
        means nothing was leased here; `LeaseManager.acquire` then does it all (the storage's
        errors are raised as `acquire` raises them)."""
        storage = self.immediate
        if (
            storage is None
            or self.on_acquire
            or self.waiters.get(request.pool)
            or (request.session is not None and self.backlog)
        ):
            return None
        lease = storage.acquire_now(request, holder=self.instance_id, now=self.clock.now())
        if lease is not None:
            self.hold(lease)
            if lease.session is not None:
                self.session_users[lease.id] = self.session_users.get(lease.id, 0) + 1
                storage.renew_now(lease, None)  # in use: no idle countdown
        return lease

    def acquire_soon(self, request: LeaseRequest) -> asyncio.Future[Any] | None:
        """Start leasing without awaiting, where `acquire_now` cannot but the storage can,
        under the same conditions; the future's answer is read with `acquired_soon`, which
        must be called. None means nothing was started: `acquire` does it all."""
        storage = self.prompt
        if storage is None or not self.may_skip_the_line(request):
            return None
        return storage.acquire_soon(request, holder=self.instance_id, now=self.clock.now())

    def acquired_soon(self, request: LeaseRequest, pending: asyncio.Future[Any]) -> Lease | None:
        """The lease `acquire_soon` got, or None when it got none (all busy, or the storage
        could not decide this way): `acquire` then does it all. Raises what `acquire` raises
        (and CancelledError when the storage was closed meanwhile)."""
        assert self.prompt is not None
        lease = self.prompt.acquired(request, pending)
        if lease is not None:
            self.hold(lease)
        return lease

    def may_skip_the_line(self, request: LeaseRequest) -> bool:
        """No session, nobody waiting in line for the pool, no callbacks to call."""
        return not (
            request.session is not None or self.on_acquire or self.waiters.get(request.pool)
        )

    def put_back_now(self, lease: Lease) -> bool:
        """`put_back` without awaiting, when nothing else needs to happen (nobody waiting in
        line for its capacity, no callbacks, nothing kept for an unavailable storage; a
        session's lease only on a storage that leases at once). False: nothing was done;
        `LeaseManager.put_back` does it all."""
        if self.on_release or self.waiters.get(lease.pool) or self.backlog or lease.id in self.lost:
            return False
        storage = self.immediate
        if lease.session is not None:
            if storage is None:
                return False
            if self.last_session_user(lease):
                if lease.id in self.unbound:
                    self.unbound.discard(lease.id)
                    if not storage.release_now(lease):
                        self.released_twice(lease)
                else:
                    storage.renew_now(lease, self.idle_until(lease))
            return True
        if storage is not None:
            self.in_use.pop(lease.id, None)
            if not storage.release_now(lease):
                self.released_twice(lease)
            return True
        pending = None if self.prompt is None else self.prompt.release_soon(lease)
        if pending is None:
            return False
        self.in_use.pop(lease.id, None)
        self.releasing[pending] = lease
        pending.add_done_callback(self._released_soon)
        return True

    def hold(self, lease: Lease) -> None:
        """A lease granted here is in use, and its upstream known for its outcomes."""
        self.in_use[lease.id] = lease
        self.upstreams[lease.upstream.id] = lease.upstream

    def last_session_user(self, lease: Lease) -> bool:
        """One user of a session's lease is done: True when it was the last one."""
        users = self.session_users.pop(lease.id, 1) - 1
        if users > 0:
            self.session_users[lease.id] = users
            return False
        self.in_use.pop(lease.id, None)
        return True

    def idle_until(self, lease: Lease) -> float | None:
        """When a session's lease, now unused, ends unless used again."""
        return None if lease.idle_ttl is None else self.clock.now() + lease.idle_ttl

    def released_twice(self, lease: Lease) -> None:
        self.double_releases += 1
        log.debug("lease %s released twice (or after it expired)", lease.id)

    def keep(self, write: LeaseWrite, error: StorageUnavailable) -> None:
        """A lease write the storage could not take: kept until it answers again."""
        self.backlog.keep_lease(write)
        self._on_storage_down(error)

    def _released_soon(self, pending: asyncio.Future[bool]) -> None:
        lease = self.releasing.pop(pending)
        if pending.cancelled():
            # Its statement was cut off before it answered: kept, as for an unavailable
            # storage, and written by the next sweep (dropped, the lease would stay held by
            # this live process for good).
            log.debug("release of lease %s cut off: kept for the next sweep", lease.id)
            self.backlog.keep_lease(LeaseWrite(lease, release=True))
            return
        error = pending.exception()
        if isinstance(error, StorageUnavailable):
            self.keep(LeaseWrite(lease, release=True), error)
        elif error is not None:
            log.warning("could not release lease %s: %s", lease.id, error)
        elif not pending.result():
            self.released_twice(lease)


def _prompt(storage: Storage) -> PromptLeasing | None:
    if _offers(storage, "acquire_soon", "acquired", "release_soon"):
        return cast(PromptLeasing, storage)
    return None


def _immediate(storage: Storage) -> ImmediateLeasing | None:
    if _offers(storage, "acquire_now", "release_now"):
        return cast(ImmediateLeasing, storage)
    return None


def _offers(storage: Storage, *methods: str) -> bool:
    # Asked of the class, not the object: a wrapper that forwards attribute lookups (one that
    # fails calls on purpose, say) must keep every call going through its awaited methods.
    kind = type(storage)
    return all(callable(getattr(kind, name, None)) for name in methods)
