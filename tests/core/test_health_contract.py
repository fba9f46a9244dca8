"""The storage contract for health and for sessions whose upstream fails: every adapter."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import NoUpstreamAvailable, SessionFailed, UpstreamNotFound
from core.health import RecordSource, Transition
from core.models import (
    HealthPolicy,
    HealthStatus,
    Lease,
    LeaseRequest,
    Outcome,
    Pool,
    StickyFailure,
)
from core.storage.interface import Storage
from tests.core.conftest import make_pool, upstream

NOW = 1_700_000_000.0


async def take(storage: Storage, request: LeaseRequest, now: float = NOW) -> Lease:
    lease = await storage.acquire(request, holder="h1", now=now)
    assert lease is not None
    return lease


async def fail(storage: Storage, upstream_id: str, times: int, now: float = NOW) -> Transition:
    transition = Transition.NONE
    for _ in range(times):
        transition = (
            await storage.record_outcome(upstream_id, Outcome.CONNECT_REFUSED, None, now)
        ).transition
    return transition


# -- passive ejection ---------------------------------------------------------------------


async def test_consecutive_failures_eject_at_the_threshold(storage: Storage) -> None:
    members = await make_pool(storage, 4)
    uid = members[0].id
    assert await fail(storage, uid, 4) is Transition.NONE
    update = await storage.record_outcome(uid, Outcome.CONNECT_TIMEOUT, None, NOW + 1)
    assert update.transition is Transition.EJECTED
    assert update.upstream.status is HealthStatus.EJECTED
    assert update.upstream.ejected_until == NOW + 1 + 30
    assert update.upstream.times_ejected == 1
    stats = await storage.stats("p", NOW + 1)
    assert (stats.ejected, stats.active, stats.panic) == (1, 3, False)
    for _ in range(6):
        assert (await take(storage, LeaseRequest("p"))).upstream.id != uid


async def test_a_success_ends_the_streak(storage: Storage) -> None:
    members = await make_pool(storage, 4)
    uid = members[0].id
    await fail(storage, uid, 4)
    await storage.record_outcome(uid, Outcome.OK, 0.01, NOW)
    assert await fail(storage, uid, 4) is Transition.NONE
    assert (await storage.get_upstream(uid)).status is HealthStatus.ACTIVE


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.TARGET_REFUSED,
        Outcome.TARGET_UNREACHABLE,
        Outcome.TARGET_ERROR,
        Outcome.RESET,
        Outcome.READ_TIMEOUT,
    ],
)
async def test_outcomes_that_are_not_the_upstreams_fault_never_eject(
    storage: Storage, outcome: Outcome
) -> None:
    members = await make_pool(storage, 4)
    uid = members[0].id
    for _ in range(50):
        update = await storage.record_outcome(uid, outcome, None, NOW)
        assert update.transition is Transition.NONE
    assert (await storage.get_upstream(uid)).status is HealthStatus.ACTIVE


async def test_a_rejected_credential_ejects_at_once(storage: Storage) -> None:
    members = await make_pool(storage, 4)
    update = await storage.record_outcome(members[1].id, Outcome.PROXY_AUTH_FAILED, None, NOW)
    assert update.transition is Transition.EJECTED
    assert update.upstream.last_error == "proxy_auth_failed"


async def test_ejection_time_grows_with_each_ejection_and_caps(storage: Storage) -> None:
    await storage.add_pool(
        Pool("p", health=HealthPolicy(failures_to_eject=2, base_ejection_s=30, max_ejection_s=100))
    )
    await storage.add_upstreams([upstream(i) for i in range(4)])
    uid = upstream(0).id
    now = NOW
    durations = []
    for _ in range(5):
        update = await storage.record_outcome(uid, Outcome.CONNECT_REFUSED, None, now)
        assert update.transition is Transition.NONE
        update = await storage.record_outcome(uid, Outcome.CONNECT_REFUSED, None, now)
        assert update.transition is Transition.EJECTED
        assert update.upstream.ejected_until is not None
        durations.append(update.upstream.ejected_until - now)
        now = update.upstream.ejected_until
        readmitted = await storage.readmit_due(now)
        assert [up.id for up in readmitted] == [uid]
    assert durations == [30, 60, 90, 100, 100]


async def test_readmit_due_returns_only_upstreams_whose_time_is_up(storage: Storage) -> None:
    members = await make_pool(storage, 4)
    await storage.eject(members[0].id, until=NOW + 10, now=NOW)
    await storage.eject(members[1].id, until=NOW + 20, now=NOW)
    assert await storage.readmit_due(NOW + 9) == []
    due = await storage.readmit_due(NOW + 10)
    assert [up.id for up in due] == [members[0].id]
    assert due[0].status is HealthStatus.ACTIVE
    assert due[0].failure_streak == 0
    stats = await storage.stats("p", NOW + 10)
    assert (stats.ejected, stats.available) == (1, 3)


async def test_the_panic_threshold_keeps_half_the_pool(storage: Storage) -> None:
    members = await make_pool(storage, 5)
    transitions = [await fail(storage, member.id, 5) for member in members]
    # floor(5 x 50%) = 2 may be ejected; the rest stay in use, and the pool says why.
    assert transitions == [Transition.EJECTED] * 2 + [Transition.PANIC] * 3
    stats = await storage.stats("p", NOW)
    assert (stats.ejected, stats.active, stats.panic) == (2, 3, True)
    leased = {(await take(storage, LeaseRequest("p"))).upstream.id for _ in range(6)}
    assert leased == {member.id for member in members[2:]}
    # Once the kept upstreams work again, the panic is over.
    for member in members[2:]:
        await storage.record_outcome(member.id, Outcome.OK, 0.01, NOW)
    assert (await storage.stats("p", NOW)).panic is False


async def test_a_pool_of_one_never_ejects_its_upstream(storage: Storage) -> None:
    members = await make_pool(storage, 1)
    assert await fail(storage, members[0].id, 20) is Transition.PANIC
    assert (await take(storage, LeaseRequest("p"))).upstream.id == members[0].id


async def test_readmission_ends_a_kept_upstreams_part_in_the_panic(storage: Storage) -> None:
    members = await make_pool(storage, 2)
    await fail(storage, members[0].id, 5)
    await fail(storage, members[1].id, 5)
    assert (await storage.stats("p", NOW)).panic
    await storage.readmit(members[1].id, now=NOW)
    assert not (await storage.stats("p", NOW)).panic


async def test_history_keeps_the_newest_results_oldest_first(storage: Storage) -> None:
    await storage.add_pool(Pool("p", health=HealthPolicy(history_size=3)))
    await storage.add_upstreams([upstream(0)])
    uid = upstream(0).id
    await storage.record_outcome(uid, Outcome.OK, 0.5, NOW)
    await storage.record_outcome(uid, Outcome.CONNECT_REFUSED, None, NOW + 1)
    await storage.record_outcome(uid, Outcome.OK, 0.25, NOW + 2, source=RecordSource.CHECK)
    await storage.record_outcome(
        uid, Outcome.PROXY_ERROR, None, NOW + 3, source=RecordSource.CHECK, detail="judge: 502"
    )
    history = await storage.history(uid)
    assert [(r.at, r.outcome, r.latency, r.source, r.detail) for r in history] == [
        (NOW + 1, Outcome.CONNECT_REFUSED, None, RecordSource.TRAFFIC, None),
        (NOW + 2, Outcome.OK, 0.25, RecordSource.CHECK, None),
        (NOW + 3, Outcome.PROXY_ERROR, None, RecordSource.CHECK, "judge: 502"),
    ]
    with pytest.raises(UpstreamNotFound):
        await storage.history("up-missing")


# Outcomes reported at the same time: PostgreSQL records them together, in one transaction,
# and must come to what one at a time would.


async def test_concurrent_failures_eject_once_at_the_threshold(storage: Storage) -> None:
    members = await make_pool(storage, 4)
    uid = members[0].id
    updates = await asyncio.gather(
        *(storage.record_outcome(uid, Outcome.CONNECT_REFUSED, None, NOW + i) for i in range(8))
    )
    assert [u.transition for u in updates] == [Transition.NONE] * 4 + [Transition.EJECTED] + [
        Transition.NONE
    ] * 3
    ejected = await storage.get_upstream(uid)
    assert (ejected.status, ejected.failure_streak, ejected.times_ejected) == (
        HealthStatus.EJECTED,
        8,
        1,
    )


async def test_concurrent_failures_across_a_pool_respect_the_panic_threshold(
    storage: Storage,
) -> None:
    members = await make_pool(storage, 5)
    updates = await asyncio.gather(
        *(
            storage.record_outcome(member.id, Outcome.CONNECT_REFUSED, None, NOW)
            for _ in range(5)
            for member in members
        )
    )
    transitions = [u.transition for u in updates]
    assert transitions.count(Transition.EJECTED) == 2
    stats = await storage.stats("p", NOW)
    assert (stats.ejected, stats.active, stats.panic) == (2, 3, True)


async def test_concurrent_outcomes_keep_their_order_and_a_missing_upstream_fails_alone(
    storage: Storage,
) -> None:
    await storage.add_pool(Pool("p", health=HealthPolicy(history_size=3)))
    await storage.add_upstreams([upstream(0), upstream(1)])
    first, second = upstream(0).id, upstream(1).id
    results = await asyncio.gather(
        storage.record_outcome(first, Outcome.OK, 0.5, NOW),
        storage.record_outcome("up-missing", Outcome.OK, 0.5, NOW),
        storage.record_outcome(second, Outcome.CONNECT_REFUSED, None, NOW + 1),
        storage.record_outcome(first, Outcome.CONNECT_REFUSED, None, NOW + 1),
        storage.record_outcome(first, Outcome.OK, 0.25, NOW + 2),
        storage.record_outcome(first, Outcome.OK, 0.125, NOW + 3),
        return_exceptions=True,
    )
    assert isinstance(results[1], UpstreamNotFound)
    assert not any(isinstance(r, BaseException) for i, r in enumerate(results) if i != 1)
    history = await storage.history(first)
    assert [(r.at, r.outcome, r.latency) for r in history] == [
        (NOW + 1, Outcome.CONNECT_REFUSED, None),
        (NOW + 2, Outcome.OK, 0.25),
        (NOW + 3, Outcome.OK, 0.125),
    ]
    kept = await storage.get_upstream(first)
    assert kept.failure_streak == 0
    assert kept.latency_ewma == pytest.approx(0.5 + 0.3 * (0.25 - 0.5) + 0.3 * (0.125 - 0.425))
    assert [r.outcome for r in await storage.history(second)] == [Outcome.CONNECT_REFUSED]


async def test_health_survives_in_what_storage_returns(storage: Storage) -> None:
    members = await make_pool(storage, 4)
    uid = members[0].id
    await storage.record_outcome(uid, Outcome.OK, 0.2, NOW)
    await storage.record_outcome(uid, Outcome.TLS_ERROR, None, NOW + 1)
    stored = await storage.get_upstream(uid)
    assert (stored.failure_streak, stored.last_error, stored.checked_at) == (
        1,
        "tls_error",
        NOW + 1,
    )
    assert stored.latency_ewma == pytest.approx(0.2)
    assert (stored.window_ok, stored.window_failed) == (1, 1)


# -- sessions when their upstream fails -----------------------------------------------------


async def sticky_pool(storage: Storage, mode: StickyFailure) -> None:
    await storage.add_pool(Pool("p", on_sticky_failure=mode, sticky_ttl=60))
    await storage.add_upstreams(
        [upstream(0, country="DE"), upstream(1, country="FR"), upstream(2, country="DE")]
    )


async def test_rebind_moves_a_session_off_an_ejected_upstream(storage: Storage) -> None:
    await sticky_pool(storage, StickyFailure.REBIND)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    assert first.rebound_from is None
    await storage.eject(first.upstream.id, until=NOW + 30, now=NOW)
    second = await take(storage, request, NOW + 1)
    assert second.upstream.id != first.upstream.id
    assert second.rebound_from == first.upstream.id
    third = await take(storage, request, NOW + 2)
    assert (third.id, third.rebound_from) == (second.id, second.rebound_from)
    assert (await storage.stats("p", NOW)).leases_held == 1


async def test_rebind_matching_keeps_the_country(storage: Storage) -> None:
    await sticky_pool(storage, StickyFailure.REBIND_MATCHING)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)  # round robin: upstream 0, DE
    assert first.upstream.country == "DE"
    await storage.eject(first.upstream.id, until=NOW + 30, now=NOW)
    second = await take(storage, request, NOW + 1)
    assert second.upstream.id == upstream(2).id
    assert second.rebound_from == first.upstream.id
    # With no other upstream of that country left, the session cannot move.
    await storage.eject(second.upstream.id, until=NOW + 30, now=NOW)
    with pytest.raises(NoUpstreamAvailable):
        await take(storage, request, NOW + 2)


async def test_fail_keeps_failing_until_the_session_expires(storage: Storage) -> None:
    await sticky_pool(storage, StickyFailure.FAIL)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    await storage.eject(first.upstream.id, until=NOW + 30, now=NOW)
    with pytest.raises(SessionFailed) as failed:
        await take(storage, request, NOW + 1)
    assert failed.value.upstream_id == first.upstream.id
    assert (await storage.stats("p", NOW + 1)).leases_held == 0  # nobody was using it
    with pytest.raises(SessionFailed):
        await take(storage, request, NOW + 60)
    await storage.release_expired(NOW + 61)
    fresh = await take(storage, request, NOW + 62)
    assert fresh.rebound_from is None
    # Other sessions were never affected.
    assert (await take(storage, LeaseRequest("p", session="s2"), NOW + 1)).uses == 1


async def test_unbind_session_rebinds_the_next_acquire(storage: Storage) -> None:
    await sticky_pool(storage, StickyFailure.REBIND)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    await storage.unbind_session(first, NOW, fail_for=None)
    assert (await storage.stats("p", NOW)).leases_held == 0  # idle: released at once
    assert await storage.release(first) is False
    second = await take(storage, request)
    assert second.id != first.id
    assert second.rebound_from == first.upstream.id


async def test_unbind_session_with_fail_for_fails_the_session(storage: Storage) -> None:
    await sticky_pool(storage, StickyFailure.FAIL)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    await storage.unbind_session(first, NOW, fail_for=60)
    with pytest.raises(SessionFailed):
        await take(storage, request, NOW + 59)
    await storage.release_expired(NOW + 60)
    assert (await take(storage, request, NOW + 60)).rebound_from is None


async def test_a_lease_in_use_outlives_its_unbound_session(storage: Storage) -> None:
    await sticky_pool(storage, StickyFailure.REBIND)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    assert await storage.renew(first, None)  # in use, as the lease manager marks it
    await storage.unbind_session(first, NOW, fail_for=None)
    second = await take(storage, request)
    assert second.id != first.id
    assert (await storage.stats("p", NOW)).leases_held == 2
    # Still in use: renewing without expiry keeps it; its last user's renew releases it.
    assert await storage.renew(first, None)
    assert await storage.renew(first, NOW + 60) is False
    assert (await storage.stats("p", NOW)).leases_held == 1
    assert await storage.release(first) is False
    # The new binding is the session's.
    assert (await take(storage, request)).id == second.id


async def test_unbinding_a_lease_the_session_already_left_changes_nothing(
    storage: Storage,
) -> None:
    await sticky_pool(storage, StickyFailure.REBIND)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    await storage.unbind_session(first, NOW, fail_for=None)
    second = await take(storage, request)
    await storage.unbind_session(first, NOW, fail_for=60)
    assert (await take(storage, request)).id == second.id
