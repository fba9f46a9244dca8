"""What this process holds, and leasing and giving back without awaiting.

The lease manager's private part (`core.leasing.manager`), compiled with the request path
(setup.py): every plain HTTP request the gateway carries from its callbacks leases and gives
back here. It alone writes the bookkeeping of what this process holds (leases in use, sessions'
users, releases on their way, writes kept for an unavailable storage, the waiting lines'
queues); the manager reads it, and changes it through these methods.
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
from core.storage.interface import NowaitLeasing, Storage

__all__ = ["Holdings"]

log = logging.getLogger("proxygate.leasing")


class Holdings:
    def __init__(
        self,
        storage: Storage,
        clock: Clock,
        holder: str,
        lines: dict[str, deque[Any]],
        on_storage_down: Callable[[StorageUnavailable], None],
        put_back_later: Callable[[Lease], None],
    ) -> None:
        """`lines`: the manager's waiting line, a queue per pool (read here, never written).
        `put_back_later(lease)`: the manager's `put_back`, started without waiting for it."""
        self.clock = clock
        self.holder = holder
        #: What the storage offers for leasing without awaiting (None where it does not).
        self.nowait = _nowait(storage)
        self._storage = storage
        self.double_releases = 0
        #: While anyone waits for a pool, its leasing and giving back go through the manager.
        self._lines = lines
        #: Callbacks want to hear of every lease taken or given back: all of it goes through
        #: the manager then.
        self.told = False
        #: Users of each session lease right now: it expires only once idle, not while in use.
        self._session_users: dict[str, int] = {}
        #: Session leases their session left (`unbind_session`): released by their last user.
        self._unbound: set[str] = set()
        #: Leases acquired here and not yet put back, and the upstream of every lease granted
        #: (what a traffic outcome kept for later is answered with).
        self._in_use: dict[str, Lease] = {}
        self._upstreams: dict[str, Upstream] = {}
        #: Leases in use here that other processes took back while the storage was away.
        self._lost: set[str] = set()
        #: Writes kept for an unavailable storage.
        self.backlog = Backlog()
        #: Releases sent without waiting, until answered: each one's answer and its lease.
        self.releasing: dict[asyncio.Future[bool], Lease] = {}
        self._on_storage_down = on_storage_down
        self._put_back_later = put_back_later

    # -- leasing without awaiting ---------------------------------------------------------

    def take_now(self, request: LeaseRequest) -> Lease | asyncio.Future[Any] | None:
        """A lease at once; a future whose answer `taken` reads (a statement sent for many
        callers brings it); or None when nothing was started here: `LeaseManager.acquire`
        then does it all (waiting in line if need be). Done only where nothing else has to
        happen: nobody waiting in line, no callbacks, nothing kept for an unavailable storage
        for a session. The storage's errors are raised as `acquire` raises them."""
        storage = self.nowait
        if (
            storage is None
            or self.told
            or request.pool in self._lines
            or (request.session is not None and self.backlog)
        ):
            return None
        answer = storage.acquire_nowait(request, holder=self.holder, now=self.clock.now())
        if type(answer) is Lease:
            self._took(storage, answer)
        return answer

    def taken(self, request: LeaseRequest, pending: asyncio.Future[Any]) -> Lease | None:
        """The lease a future from `take_now` brought, or None when it brought none (all busy,
        or the storage could not decide this way): `acquire` then does it all. Raises what
        `acquire` raises (and CancelledError when the storage was closed meanwhile)."""
        storage = self.nowait
        assert storage is not None
        lease = storage.acquired(request, pending)
        if lease is not None:
            self._took(storage, lease)
        return lease

    def _took(self, storage: NowaitLeasing, lease: Lease) -> None:
        self.hold(lease)
        if lease.session is not None:
            self.session_user_joined(lease)
            # In use: no idle countdown. A storage that grants a session's lease without
            # awaiting renews it so too.
            storage.renew_nowait(lease, None)

    def give_back(self, lease: Lease) -> None:
        """`put_back_now`, or else the manager's `put_back` in a task of its own."""
        if not self.put_back_now(lease):
            self._put_back_later(lease)

    def put_back_now(self, lease: Lease) -> bool:
        """`LeaseManager.put_back` without awaiting, when nothing else needs to happen (nobody
        waiting in line for its capacity, no callbacks, nothing kept for an unavailable
        storage). False: nothing was done; `put_back` does it all."""
        storage = self.nowait
        if (
            storage is None
            or self.told
            or lease.pool in self._lines
            or self.backlog
            or lease.id in self._lost
        ):
            return False
        if lease.session is not None:
            return self._session_put_back_now(storage, lease)
        if not self._release_nowait(storage, lease):
            return False
        self._in_use.pop(lease.id, None)
        return True

    def _session_put_back_now(self, storage: NowaitLeasing, lease: Lease) -> bool:
        if self._session_users.get(lease.id, 1) > 1:
            self.last_session_user(lease)  # others still use it: nothing to write
            return True
        if lease.id in self._unbound:
            if not self._release_nowait(storage, lease):
                return False
            self._unbound.discard(lease.id)
        elif storage.renew_nowait(lease, self.idle_until(lease)) is None:
            return False  # its idle countdown must be awaited
        self.last_session_user(lease)
        return True

    def _release_nowait(self, storage: NowaitLeasing, lease: Lease) -> bool:
        """Release done at once or sent without waiting (its answer read as it comes); False
        when it must be awaited (nothing done)."""
        answer = storage.release_nowait(lease)
        if answer is None:
            return False
        if type(answer) is bool:
            if not answer:
                self.released_twice(lease)
            return True
        self.releasing[answer] = lease
        answer.add_done_callback(self._released_soon)
        return True

    # -- what is held here ------------------------------------------------------------------

    def hold(self, lease: Lease) -> None:
        """A lease granted here is in use, and its upstream known for its outcomes."""
        self._in_use[lease.id] = lease
        self._upstreams[lease.upstream.id] = lease.upstream

    def session_user_joined(self, lease: Lease) -> None:
        self._session_users[lease.id] = self._session_users.get(lease.id, 0) + 1

    def users_of(self, lease: Lease) -> int:
        return self._session_users.get(lease.id, 0)

    def last_session_user(self, lease: Lease) -> bool:
        """One user of a session's lease is done: True when it was the last one."""
        users = self._session_users.pop(lease.id, 1) - 1
        if users > 0:
            self._session_users[lease.id] = users
            return False
        self._in_use.pop(lease.id, None)
        return True

    def idle_until(self, lease: Lease) -> float | None:
        """When a session's lease, now unused, ends unless used again."""
        return None if lease.idle_ttl is None else self.clock.now() + lease.idle_ttl

    def unbind(self, lease: Lease) -> None:
        """The lease's session left it: its last user releases it."""
        self._unbound.add(lease.id)

    def parted(self, lease: Lease) -> bool:
        """Whether the lease's session left it (asked once: the answer is forgotten)."""
        if lease.id in self._unbound:
            self._unbound.discard(lease.id)
            return True
        return False

    def ended(self, lease: Lease) -> bool:
        """The lease is being released: forgotten here (any write kept for it included).
        True when other processes had taken it back meanwhile (nothing of ours to release)."""
        self._forget(lease.id)
        self._unbound.discard(lease.id)
        if lease.id in self._lost:
            self._lost.discard(lease.id)
            return True
        return False

    def expired(self, lease: Lease) -> None:
        """The storage ended the lease (its time was up)."""
        self._forget(lease.id)

    def lose(self, lease_ids: list[str]) -> None:
        """Other processes took these leases back while the storage was out of reach."""
        for lease_id in lease_ids:
            self._forget(lease_id)
            self._unbound.discard(lease_id)
            self._lost.add(lease_id)

    def _forget(self, lease_id: str) -> None:
        """Neither in use nor owed a write here any more."""
        self._session_users.pop(lease_id, None)
        self._in_use.pop(lease_id, None)
        self.backlog.forget(lease_id)

    def in_use(self) -> list[str]:
        return list(self._in_use)

    def is_in_use(self, lease_id: str) -> bool:
        return lease_id in self._in_use

    def upstream(self, upstream_id: str) -> Upstream | None:
        """The upstream of a lease granted here, as last seen."""
        return self._upstreams.get(upstream_id)

    def known(self) -> set[str]:
        """Every lease this process knows it holds: in use, being given back (or kept to be),
        or held ahead by the storage itself."""
        known = set(self._in_use)
        known.update(self.backlog.leases)
        known.update(lease.id for lease in self.releasing.values())
        known.update(self._storage.leases_held_ahead())
        return known

    # -- giving back ------------------------------------------------------------------------

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


def _nowait(storage: Storage) -> NowaitLeasing | None:
    # Asked of the class, not the object: a wrapper that forwards attribute lookups (one that
    # fails calls on purpose, say) must keep every call going through its awaited methods.
    kind = type(storage)
    methods = ("acquire_nowait", "acquired", "release_nowait", "renew_nowait")
    if all(callable(getattr(kind, name, None)) for name in methods):
        return cast(NowaitLeasing, storage)
    return None
