"""The pure health policy: the success-rate window, outliers and the ejection cap."""

from __future__ import annotations

import pytest

from core import health
from core.models import HealthPolicy, Outcome, Upstream

NOW = 1_000.0
POLICY = HealthPolicy(window_s=60.0, success_rate_ejection=True)


def member(index: int) -> Upstream:
    return Upstream.from_url(f"http://10.0.0.{index + 1}:8080", "p")


def feed(upstream: Upstream, ok: int, failed: int, now: float = NOW) -> None:
    for _ in range(ok):
        health.observe(upstream, Outcome.OK, 0.01, now, POLICY)
    for _ in range(failed):
        health.observe(upstream, Outcome.RESET, None, now, POLICY)


def test_the_success_rate_slides_over_the_window() -> None:
    up = member(0)
    assert health.success_rate(up, NOW, POLICY) == (1.0, 0.0)
    feed(up, ok=6, failed=4)
    assert health.success_rate(up, NOW + 1, POLICY) == (0.6, 10.0)
    # A new bucket: the previous one weighs by how much of it the window still covers.
    feed(up, ok=10, failed=0, now=NOW + 90)
    rate, volume = health.success_rate(up, NOW + 90, POLICY)
    assert volume == pytest.approx(10 + 10 * 0.5)
    assert rate == pytest.approx((10 + 6 * 0.5) / 15)
    # Results older than two windows are gone.
    assert health.success_rate(up, NOW + 300, POLICY) == (1.0, 0.0)
    feed(up, ok=1, failed=1, now=NOW + 300)
    assert health.success_rate(up, NOW + 300, POLICY) == (0.5, 2.0)


def test_an_outlier_far_below_the_pool_is_found() -> None:
    members = [member(i) for i in range(6)]
    for up in members[:5]:
        feed(up, ok=98, failed=2)
    feed(members[5], ok=40, failed=60)
    assert health.success_rate_outliers(members, NOW, POLICY) == [members[5]]


def test_no_outliers_without_enough_volume_or_upstreams_or_when_disabled() -> None:
    members = [member(i) for i in range(6)]
    for up in members[:5]:
        feed(up, ok=98, failed=2)
    feed(members[5], ok=4, failed=6)  # below success_rate_min_requests
    assert health.success_rate_outliers(members, NOW, POLICY) == []
    feed(members[5], ok=40, failed=60)
    assert health.success_rate_outliers(members[2:], NOW, POLICY) == []  # 4 rated < 5
    off = HealthPolicy(success_rate_ejection=False)
    assert health.success_rate_outliers(members, NOW, off) == []


@pytest.mark.parametrize(
    ("total", "ejected", "percent", "allowed"),
    [(1, 0, 50, False), (2, 0, 50, True), (2, 1, 50, False), (5, 1, 50, True), (5, 2, 50, False),
     (10, 9, 100, True), (10, 0, 0, False)],
)
def test_the_ejection_cap(total: int, ejected: int, percent: float, allowed: bool) -> None:
    policy = HealthPolicy(max_ejection_percent=percent)
    assert health.ejection_allowed(total, ejected, policy) is allowed
