"""The storage contract: every adapter passes each of these, one behaviour a test."""

from __future__ import annotations

import asyncio
import collections
import contextlib

import pytest

from core.endpoints import Scheme
from core.errors import CatalogError, NoUpstreamAvailable, PoolNotFound, UpstreamNotFound
from core.filters import Filter, GeoRadius
from core.models import HealthStatus, Lease, LeaseRequest, Outcome, Pool, Selector, Upstream
from core.storage.interface import Storage
from tests.core.conftest import make_pool, upstream

NOW = 1_700_000_000.0


async def take(storage: Storage, request: LeaseRequest, now: float = NOW) -> Lease:
    lease = await storage.acquire(request, holder="h1", now=now)
    assert lease is not None
    return lease


async def hosts_in_turn(storage: Storage, request: LeaseRequest, turns: int) -> list[str]:
    """Acquire and release `turns` times, returning which upstream served each turn."""
    served = []
    for _ in range(turns):
        lease = await take(storage, request)
        served.append(lease.upstream.endpoint.host)
        assert await storage.release(lease)
    return served


# -- catalog --------------------------------------------------------------------------------


async def test_pools_are_added_listed_updated_and_removed(storage: Storage) -> None:
    await storage.add_pool(Pool("a", selector=Selector.RANDOM, retries=5))
    await storage.add_pool(Pool("b"))
    assert [p.name for p in await storage.list_pools()] == ["a", "b"]
    assert (await storage.get_pool("a")).retries == 5
    await storage.update_pool(Pool("a", selector=Selector.LEAST_USED, retries=1))
    assert (await storage.get_pool("a")).selector is Selector.LEAST_USED
    await storage.remove_pool("a")
    with pytest.raises(PoolNotFound):
        await storage.get_pool("a")
    with pytest.raises(CatalogError):
        await storage.add_pool(Pool("b"))
    with pytest.raises(PoolNotFound):
        await storage.update_pool(Pool("missing"))


async def test_upstreams_are_added_updated_and_removed(storage: Storage) -> None:
    members = await make_pool(storage, 3)
    assert [u.id for u in await storage.list_upstreams("p")] == [u.id for u in members]
    updated = await storage.update_upstream(members[0].id, country="ar", tags=frozenset({"x"}))
    assert (updated.country, updated.tags) == ("AR", frozenset({"x"}))
    assert (await storage.get_upstream(members[0].id)).country == "AR"
    await storage.remove_upstream(members[1].id)
    assert len(await storage.list_upstreams("p")) == 2
    with pytest.raises(UpstreamNotFound):
        await storage.get_upstream(members[1].id)
    with pytest.raises(CatalogError):
        await storage.update_upstream(members[0].id, status="ejected")


async def test_bulk_add_is_all_or_nothing(storage: Storage) -> None:
    members = await make_pool(storage, 2)
    with pytest.raises(CatalogError):
        await storage.add_upstreams([upstream(10), members[0]])
    with pytest.raises(PoolNotFound):
        await storage.add_upstreams([upstream(11, pool="nowhere")])
    assert len(await storage.list_upstreams("p")) == 2


async def test_a_pool_holding_leases_cannot_be_removed(storage: Storage) -> None:
    await make_pool(storage, 1)
    lease = await take(storage, LeaseRequest("p"))
    with pytest.raises(CatalogError, match="still holds"):
        await storage.remove_pool("p")
    await storage.release(lease)
    await storage.remove_pool("p")


async def test_bulk_add_of_100k_upstreams(storage: Storage) -> None:
    await storage.add_pool(Pool("big"))
    added = await storage.add_upstreams(upstream(i, "big") for i in range(100_000))
    assert added == 100_000
    stats = await storage.stats("big", NOW)
    assert (stats.total, stats.available) == (100_000, 100_000)
    lease = await take(storage, LeaseRequest("big"))
    assert await storage.release(lease)


# -- selectors ------------------------------------------------------------------------------


async def test_round_robin_visits_every_upstream_in_turn(storage: Storage) -> None:
    members = await make_pool(storage, 4)
    served = await hosts_in_turn(storage, LeaseRequest("p"), 12)
    assert served == [u.endpoint.host for u in members] * 3


async def test_round_robin_spreads_held_leases(storage: Storage) -> None:
    await make_pool(storage, 4)
    leases = [await take(storage, LeaseRequest("p")) for _ in range(8)]
    assert collections.Counter(lease.upstream.id for lease in leases).most_common(1)[0][1] == 2


async def test_first_available_prefers_the_first_with_capacity(storage: Storage) -> None:
    members = await make_pool(storage, 3, selector=Selector.FIRST_AVAILABLE, max_concurrency=2)
    held = [await take(storage, LeaseRequest("p")) for _ in range(3)]
    assert [lease.upstream.id for lease in held] == [members[0].id, members[0].id, members[1].id]
    await storage.release(held[0])
    assert (await take(storage, LeaseRequest("p"))).upstream.id == members[0].id


async def test_least_used_takes_the_upstream_holding_fewest_leases(storage: Storage) -> None:
    members = await make_pool(storage, 3, selector=Selector.LEAST_USED)
    held = [await take(storage, LeaseRequest("p")) for _ in range(6)]
    counts = collections.Counter(lease.upstream.id for lease in held)
    assert set(counts.values()) == {2}
    # Free two leases of one upstream: it is now the least used and is chosen next.
    target = members[1].id
    for lease in [lease for lease in held if lease.upstream.id == target]:
        await storage.release(lease)
    assert (await take(storage, LeaseRequest("p"))).upstream.id == target
    assert (await take(storage, LeaseRequest("p"))).upstream.id == target


async def test_random_reaches_every_upstream_roughly_evenly(storage: Storage) -> None:
    await make_pool(storage, 4, selector=Selector.RANDOM)
    counts = collections.Counter(await hosts_in_turn(storage, LeaseRequest("p"), 2000))
    assert len(counts) == 4
    assert min(counts.values()) > 350  # expected 500 each; 350 is > 7 sigma away


async def test_lowest_latency_prefers_the_fastest_then_the_next(storage: Storage) -> None:
    members = await make_pool(storage, 3, selector=Selector.LOWEST_LATENCY, max_concurrency=1)
    for member, latency in zip(members, (0.30, 0.05, 0.10), strict=True):
        await storage.record_outcome(member.id, Outcome.OK, latency, NOW)
    first = await take(storage, LeaseRequest("p"))
    second = await take(storage, LeaseRequest("p"))
    assert [first.upstream.id, second.upstream.id] == [members[1].id, members[2].id]
    # The fastest slows down: the other one is now preferred.
    await storage.release(first)
    await storage.release(second)
    for _ in range(10):
        await storage.record_outcome(members[1].id, Outcome.OK, 2.0, NOW)
    assert (await take(storage, LeaseRequest("p"))).upstream.id == members[2].id


async def test_lowest_latency_tries_unmeasured_upstreams_first(storage: Storage) -> None:
    members = await make_pool(storage, 2, selector=Selector.LOWEST_LATENCY)
    await storage.record_outcome(members[0].id, Outcome.OK, 0.01, NOW)
    assert (await take(storage, LeaseRequest("p"))).upstream.id == members[1].id


async def test_weighted_follows_the_weights(storage: Storage) -> None:
    members = await make_pool(storage, 3, selector=Selector.WEIGHTED)
    await storage.update_upstream(members[0].id, weight=3.0)
    await storage.update_upstream(members[1].id, weight=1.0)
    await storage.update_upstream(members[2].id, weight=0.0)
    counts = collections.Counter(await hosts_in_turn(storage, LeaseRequest("p"), 4000))
    assert members[2].endpoint.host not in counts
    share = counts[members[0].endpoint.host] / 4000
    assert 0.70 < share < 0.80  # expected 0.75


async def test_a_request_may_override_the_pool_selector(storage: Storage) -> None:
    members = await make_pool(storage, 3, selector=Selector.ROUND_ROBIN)
    request = LeaseRequest("p", selector=Selector.FIRST_AVAILABLE)
    served = await hosts_in_turn(storage, request, 3)
    assert served == [members[0].endpoint.host] * 3


async def test_full_upstreams_are_skipped_and_return_when_released(storage: Storage) -> None:
    members = await make_pool(storage, 2, max_concurrency=1)
    a = await take(storage, LeaseRequest("p"))
    b = await take(storage, LeaseRequest("p"))
    assert {a.upstream.id, b.upstream.id} == {m.id for m in members}
    assert await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW) is None
    await storage.release(a)
    assert (await take(storage, LeaseRequest("p"))).upstream.id == a.upstream.id


async def test_an_upstream_limit_overrides_the_pool_limit(storage: Storage) -> None:
    await storage.add_pool(Pool("p", max_concurrency=1))
    await storage.add_upstreams([upstream(0, max_concurrency=3)])
    held = [await take(storage, LeaseRequest("p")) for _ in range(3)]
    assert len(held) == 3
    assert await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW) is None


async def test_raising_a_pool_limit_frees_capacity(storage: Storage) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    await take(storage, LeaseRequest("p"))
    assert await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW) is None
    await storage.update_pool(Pool("p", max_concurrency=2))
    await take(storage, LeaseRequest("p"))


@pytest.mark.parametrize("selector", list(Selector))
async def test_every_selector_skips_ejected_upstreams(storage: Storage, selector: Selector) -> None:
    members = await make_pool(storage, 3, selector=selector)
    await storage.eject(members[0].id, until=NOW + 30, now=NOW)
    await storage.eject(members[2].id, until=NOW + 30, now=NOW)
    served = set(await hosts_in_turn(storage, LeaseRequest("p"), 20))
    assert served == {members[1].endpoint.host}
    await storage.readmit(members[0].id, now=NOW)
    served = set(await hosts_in_turn(storage, LeaseRequest("p", selector=selector), 40))
    assert members[0].endpoint.host in served or selector is Selector.FIRST_AVAILABLE


async def test_removed_upstreams_are_not_leased_but_their_leases_release(storage: Storage) -> None:
    members = await make_pool(storage, 2)
    lease = await take(storage, LeaseRequest("p"))
    await storage.remove_upstream(lease.upstream.id)
    served = set(await hosts_in_turn(storage, LeaseRequest("p"), 4))
    assert served == {m.endpoint.host for m in members} - {lease.upstream.endpoint.host}
    assert await storage.release(lease)
    assert (await storage.stats("p", NOW)).leases_held == 0


# -- no upstream ----------------------------------------------------------------------------


async def test_unknown_pool_raises(storage: Storage) -> None:
    with pytest.raises(PoolNotFound):
        await storage.acquire(LeaseRequest("nowhere"), holder="h1", now=NOW)


async def test_empty_or_fully_ejected_pool_raises_instead_of_returning_none(
    storage: Storage,
) -> None:
    await storage.add_pool(Pool("empty"))
    with pytest.raises(NoUpstreamAvailable, match="no upstreams"):
        await storage.acquire(LeaseRequest("empty"), holder="h1", now=NOW)
    members = await make_pool(storage, 1)
    await storage.eject(members[0].id, until=NOW + 30, now=NOW)
    with pytest.raises(NoUpstreamAvailable, match="ejected"):
        await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW)


async def test_a_filter_nothing_matches_raises(storage: Storage) -> None:
    await make_pool(storage, 2)
    request = LeaseRequest("p", filters=Filter(country="ZZ"))
    with pytest.raises(NoUpstreamAvailable, match="matches"):
        await storage.acquire(request, holder="h1", now=NOW)


# -- filters --------------------------------------------------------------------------------


async def attributed_pool(storage: Storage) -> dict[str, Upstream]:
    await storage.add_pool(Pool("geo", selector=Selector.FIRST_AVAILABLE))
    members = {
        "ar-http": Upstream.from_url(
            "http://10.1.0.1:8080",
            "geo",
            country="ar",
            city="Buenos Aires",
            asn=7303,
            isp="Telecom",
            source="vendor-a",
            tags=frozenset({"residential", "fast"}),
            latitude=-34.60,
            longitude=-58.38,
        ),
        "ar-socks": Upstream.from_url(
            "socks5://10.1.0.2:1080",
            "geo",
            country="AR",
            city="Cordoba",
            asn=27747,
            isp="Telecentro",
            source="vendor-b",
            tags=frozenset({"residential"}),
            latitude=-31.42,
            longitude=-64.18,
        ),
        "us-http": Upstream.from_url(
            "http://10.1.0.3:8080",
            "geo",
            country="US",
            city="Miami",
            asn=7922,
            isp="Comcast",
            source="vendor-a",
            tags=frozenset({"datacenter", "fast"}),
            latitude=25.76,
            longitude=-80.19,
        ),
    }
    await storage.add_upstreams(members.values())
    return members


async def matching(storage: Storage, members: dict[str, Upstream], flt: Filter) -> set[str]:
    """Names of the upstreams a filter lets through, found by leasing until none is left."""
    by_id = {u.id: name for name, u in members.items()}
    found: set[str] = set()
    held = []
    try:
        while True:
            lease = await storage.acquire(LeaseRequest("geo", filters=flt), holder="h", now=NOW)
            if lease is None or by_id[lease.upstream.id] in found:
                break
            found.add(by_id[lease.upstream.id])
            held.append(lease)
            await storage.update_upstream(lease.upstream.id, max_concurrency=1)
    except NoUpstreamAvailable:
        pass
    for lease in held:
        await storage.release(lease)
        await storage.update_upstream(lease.upstream.id, max_concurrency=None)
    return found


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (Filter(country="ar"), {"ar-http", "ar-socks"}),
        (Filter(city="Miami"), {"us-http"}),
        (Filter(asn=27747), {"ar-socks"}),
        (Filter(isp="Telecom"), {"ar-http"}),
        (Filter(source="vendor-a"), {"ar-http", "us-http"}),
        (Filter(scheme=Scheme.SOCKS5), {"ar-socks"}),
        (Filter(country="AR", scheme=Scheme.HTTP), {"ar-http"}),
        (Filter(tags_all=frozenset({"residential", "fast"})), {"ar-http"}),
        (Filter(tags_any=frozenset({"datacenter", "fast"})), {"ar-http", "us-http"}),
        (Filter(near=GeoRadius(-34.6, -58.4, 50.0)), {"ar-http"}),
        (Filter(near=GeoRadius(-34.6, -58.4, 800.0)), {"ar-http", "ar-socks"}),
        (Filter(any_of=(Filter(city="Miami"), Filter(asn=27747))), {"us-http", "ar-socks"}),
        (Filter(all_of=(Filter(country="AR"), Filter(tags_any=frozenset({"fast"})))), {"ar-http"}),
        (Filter(none_of=(Filter(country="AR"),)), {"us-http"}),
        (
            Filter(
                any_of=(
                    Filter(all_of=(Filter(country="US"), Filter(source="vendor-a"))),
                    Filter(none_of=(Filter(tags_any=frozenset({"fast", "datacenter"})),)),
                )
            ),
            {"us-http", "ar-socks"},
        ),
        (Filter(predicate=lambda u: u.endpoint.port == 1080), {"ar-socks"}),
        (Filter(country="AR", predicate=lambda u: (u.asn or 0) > 10_000), {"ar-socks"}),
    ],
)
async def test_filters_select_exactly_the_matching_upstreams(
    storage: Storage, flt: Filter, expected: set[str]
) -> None:
    members = await attributed_pool(storage)
    assert await matching(storage, members, flt) == expected


async def test_filtered_round_robin_rotates_among_matches(storage: Storage) -> None:
    await storage.add_pool(Pool("p"))
    await storage.add_upstreams([upstream(i, country="AR" if i % 2 else "US") for i in range(6)])
    request = LeaseRequest("p", filters=Filter(country="AR"))
    served = await hosts_in_turn(storage, request, 6)
    assert len(set(served[:3])) == 3
    assert served[:3] == served[3:]


async def test_filters_skip_full_upstreams(storage: Storage) -> None:
    await storage.add_pool(Pool("p", max_concurrency=1))
    await storage.add_upstreams([upstream(i, country="AR") for i in range(2)])
    request = LeaseRequest("p", filters=Filter(country="AR"))
    await take(storage, request)
    await take(storage, request)
    assert await storage.acquire(request, holder="h1", now=NOW) is None


# -- concurrency limit ----------------------------------------------------------------------


async def test_max_concurrency_is_never_exceeded(storage: Storage) -> None:
    await make_pool(storage, 5, max_concurrency=3)
    held = []
    while (lease := await storage.acquire(LeaseRequest("p"), holder="h1", now=NOW)) is not None:
        held.append(lease)
    assert len(held) == 15
    assert max(collections.Counter(lease.upstream.id for lease in held).values()) == 3


# -- release, renew, expiry -----------------------------------------------------------------


async def test_double_release_changes_nothing_and_says_so(storage: Storage) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    lease = await take(storage, LeaseRequest("p"))
    assert await storage.release(lease) is True
    other = await take(storage, LeaseRequest("p"))
    assert await storage.release(lease) is False
    stats = await storage.stats("p", NOW)
    assert (stats.leases_held, stats.available) == (1, 0)
    assert await storage.release(other) is True


async def test_leases_with_a_duration_expire_and_are_swept(storage: Storage) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    lease = await take(storage, LeaseRequest("p", duration=10.0))
    assert lease.expires_at == NOW + 10.0
    assert await storage.release_expired(NOW + 9.9) == []
    expired = await storage.release_expired(NOW + 10.0)
    assert [e.id for e in expired] == [lease.id]
    assert await storage.release(lease) is False
    assert (await storage.stats("p", NOW)).leases_held == 0


async def test_leases_without_duration_never_expire(storage: Storage) -> None:
    await make_pool(storage, 1)
    lease = await take(storage, LeaseRequest("p"))
    assert lease.expires_at is None
    assert await storage.release_expired(NOW + 10**9) == []
    assert await storage.release(lease)


async def test_renew_moves_the_expiry_both_ways(storage: Storage) -> None:
    await make_pool(storage, 2)
    later = await take(storage, LeaseRequest("p", duration=10.0))
    sooner = await take(storage, LeaseRequest("p", duration=10.0))
    assert await storage.renew(later, NOW + 100.0)
    assert await storage.renew(sooner, NOW + 5.0)
    assert [e.id for e in await storage.release_expired(NOW + 6.0)] == [sooner.id]
    assert await storage.release_expired(NOW + 99.0) == []
    assert [e.id for e in await storage.release_expired(NOW + 100.0)] == [later.id]
    assert await storage.renew(later, NOW + 200.0) is False


async def test_released_leases_are_not_swept_again(storage: Storage) -> None:
    await make_pool(storage, 1)
    for _ in range(3000):
        await storage.release(await take(storage, LeaseRequest("p", duration=5.0)))
    assert await storage.release_expired(NOW + 10.0) == []


async def held_leases_settle(storage: Storage, pool: str = "p") -> list[Lease]:
    """The pool's leases once storage work nobody waits for (a give-back) has landed."""
    for _ in range(200):
        held = await storage.list_leases(pool)
        if not held:
            break
        await asyncio.sleep(0.01)
    return held


@pytest.mark.parametrize("yields", [0, 1, 2, 5])
async def test_an_acquire_cancelled_midway_leaks_no_lease(storage: Storage, yields: int) -> None:
    await make_pool(storage, 2)
    assert await storage.release(await take(storage, LeaseRequest("p")))  # the path warmed up
    acquiring = asyncio.ensure_future(storage.acquire(LeaseRequest("p"), holder="h1", now=NOW))
    for _ in range(yields):
        await asyncio.sleep(0)
    acquiring.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        lease = await acquiring
        assert lease is not None
        assert await storage.release(lease)  # finished before the cancel: ours to give back
    assert await held_leases_settle(storage) == []
    lease = await take(storage, LeaseRequest("p"))  # and the counts are right
    assert (await storage.stats("p", NOW)).leased == 1
    assert await storage.release(lease)


@pytest.mark.parametrize("yields", [1, 2, 3])
async def test_a_release_whose_caller_is_cancelled_still_happens(
    storage: Storage, yields: int
) -> None:
    await make_pool(storage, 1, max_concurrency=1)
    lease = await take(storage, LeaseRequest("p"))
    releasing = asyncio.ensure_future(storage.release(lease))
    for _ in range(yields):
        await asyncio.sleep(0)
    releasing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await releasing
    assert await held_leases_settle(storage) == []
    assert (await storage.stats("p", NOW)).leased == 0
    assert await storage.release(await take(storage, LeaseRequest("p")))


# -- sessions -------------------------------------------------------------------------------


async def test_a_session_keeps_its_upstream_while_used(storage: Storage) -> None:
    await make_pool(storage, 4, sticky_ttl=60.0)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    for step in range(1, 5):
        again = await take(storage, request, now=NOW + step * 50.0)
        assert again.id == first.id
        assert again.expires_at == NOW + step * 50.0 + 60.0
    assert again.uses == 5
    assert (await storage.stats("p", NOW)).leases_held == 1


async def test_sessions_are_independent_per_id_and_consumer(storage: Storage) -> None:
    await make_pool(storage, 4)
    a = await take(storage, LeaseRequest("p", session="s1"))
    b = await take(storage, LeaseRequest("p", session="s2"))
    c = await take(storage, LeaseRequest("p", consumer="bob", session="s1"))
    assert len({a.id, b.id, c.id}) == 3


async def test_an_idle_session_expires_and_rebinds(storage: Storage) -> None:
    await make_pool(storage, 4)
    request = LeaseRequest("p", session="s1", session_ttl=30.0)
    first = await take(storage, request)
    assert first.idle_ttl == 30.0
    assert [e.id for e in await storage.release_expired(NOW + 30.0)] == [first.id]
    second = await take(storage, request, now=NOW + 31.0)
    assert second.id != first.id


async def test_an_expired_session_rebinds_even_before_the_sweep(storage: Storage) -> None:
    await make_pool(storage, 4)
    request = LeaseRequest("p", session="s1", session_ttl=30.0)
    first = await take(storage, request)
    second = await take(storage, request, now=NOW + 31.0)
    assert second.id != first.id
    assert (await storage.stats("p", NOW)).leases_held == 1


async def test_a_session_on_an_ejected_upstream_rebinds(storage: Storage) -> None:
    await make_pool(storage, 3)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    await storage.eject(first.upstream.id, until=NOW + 30, now=NOW)
    second = await take(storage, request)
    assert second.upstream.id != first.upstream.id
    assert (await storage.stats("p", NOW)).leases_held == 1


async def test_releasing_a_session_lease_ends_the_session(storage: Storage) -> None:
    await make_pool(storage, 4)
    request = LeaseRequest("p", session="s1")
    first = await take(storage, request)
    await storage.release(first)
    assert (await take(storage, request)).id != first.id


# -- health write side ----------------------------------------------------------------------


async def test_outcomes_update_streak_latency_and_last_error(storage: Storage) -> None:
    members = await make_pool(storage, 1)
    uid = members[0].id
    await storage.record_outcome(uid, Outcome.CONNECT_REFUSED, None, NOW)
    after = (await storage.record_outcome(uid, Outcome.CONNECT_TIMEOUT, None, NOW + 1)).upstream
    assert (after.failure_streak, after.last_error, after.checked_at) == (
        2,
        "connect_timeout",
        NOW + 1,
    )
    # The target's own failures say nothing about the upstream.
    after = (await storage.record_outcome(uid, Outcome.TARGET_REFUSED, None, NOW + 2)).upstream
    assert (after.failure_streak, after.last_error) == (2, "connect_timeout")
    after = (await storage.record_outcome(uid, Outcome.OK, 0.100, NOW + 3)).upstream
    assert after.failure_streak == 0
    assert after.latency_ewma == pytest.approx(0.100)
    after = (await storage.record_outcome(uid, Outcome.OK, 0.200, NOW + 4)).upstream
    assert 0.100 < (after.latency_ewma or 0) < 0.200
    with pytest.raises(UpstreamNotFound):
        await storage.record_outcome("up-missing", Outcome.OK, 0.1, NOW)


async def test_eject_and_readmit_keep_count(storage: Storage) -> None:
    members = await make_pool(storage, 2)
    ejected = await storage.eject(members[0].id, until=NOW + 30, now=NOW)
    assert (ejected.status, ejected.ejected_until, ejected.times_ejected) == (
        HealthStatus.EJECTED,
        NOW + 30,
        1,
    )
    stats = await storage.stats("p", NOW)
    assert (stats.active, stats.ejected, stats.available) == (1, 1, 1)
    back = await storage.readmit(members[0].id, now=NOW + 5)
    assert (back.status, back.ejected_until, back.times_ejected) == (HealthStatus.ACTIVE, None, 1)
    assert (await storage.stats("p", NOW)).available == 2


# -- stats ----------------------------------------------------------------------------------


async def test_stats_count_every_state(storage: Storage) -> None:
    members = await make_pool(storage, 4, max_concurrency=2)
    held = [await take(storage, LeaseRequest("p", selector=Selector.FIRST_AVAILABLE))]
    held.append(await take(storage, LeaseRequest("p", selector=Selector.FIRST_AVAILABLE)))
    held.append(await take(storage, LeaseRequest("p", selector=Selector.FIRST_AVAILABLE)))
    await storage.eject(members[3].id, until=NOW + 30, now=NOW)
    stats = await storage.stats("p", NOW + 1)
    assert stats.pool == "p"
    assert stats.total == 4
    assert stats.active == 3
    assert stats.ejected == 1
    assert stats.leased == 2  # members 0 (full) and 1
    assert stats.available == 2  # members 1 and 2
    assert stats.leases_held == 3
    assert stats.total_leases == 3
    assert stats.collected_at == NOW + 1
    for lease in held:
        await storage.release(lease)
    stats = await storage.stats("p", NOW)
    assert (stats.leased, stats.leases_held, stats.total_leases, stats.available) == (0, 0, 3, 3)
