"""Passive health: what one attempt's outcome does to an upstream, and when a pool ejects.

Pure functions over an upstream's health fields. Every storage adapter calls them inside the
same atomic step that records the outcome, so processes sharing a database apply one policy to
one state. Nothing here awaits or reads a clock: `now` comes from the caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from core.models import HealthPolicy, HealthStatus, Outcome, Upstream

__all__ = [
    "HealthRecord",
    "HealthUpdate",
    "RecordSource",
    "Transition",
    "ejection_allowed",
    "ejection_end",
    "in_panic",
    "observe",
    "success_rate",
    "success_rate_outliers",
]


class Transition(StrEnum):
    #: Nothing changed that anyone must hear of.
    NONE = "none"
    #: The upstream was ejected by this outcome.
    EJECTED = "ejected"
    #: The upstream called for ejection, but its pool is at `max_ejection_percent`: it stays.
    PANIC = "panic"


class RecordSource(StrEnum):
    TRAFFIC = "traffic"
    CHECK = "check"


@dataclass(slots=True, frozen=True)
class HealthRecord:
    """One entry of an upstream's bounded result history."""

    at: float
    outcome: Outcome
    latency: float | None
    source: RecordSource
    detail: str | None = None


@dataclass(slots=True, frozen=True)
class HealthUpdate:
    """What `Storage.record_outcome` did: the upstream after, and the transition, if any."""

    upstream: Upstream
    transition: Transition


#: Weight of the newest sample in an upstream's latency EWMA.
LATENCY_EWMA_ALPHA = 0.3


def observe(
    upstream: Upstream, outcome: Outcome, latency: float | None, now: float, policy: HealthPolicy
) -> bool:
    """Fold one outcome into `upstream`'s health fields; True when it now calls for ejection.

    `ok` ends the failure streak and feeds the latency EWMA; an outcome that counts against the
    upstream lengthens the streak; a target-side outcome changes nothing. `reset` and
    `read_timeout` are remembered as the last error and count in the success rate, but not in
    the streak: they happen after the upstream did its part, and a target that stalls or
    resets must never eject the upstreams that reach it.
    """
    upstream.checked_at = now
    _roll_window(upstream, now, policy.window_s)
    if outcome is Outcome.OK:
        upstream.failure_streak = 0
        upstream.window_ok += 1
        if latency is not None:
            previous = upstream.latency_ewma
            if previous is not None:
                latency = previous + LATENCY_EWMA_ALPHA * (latency - previous)
            upstream.latency_ewma = latency
        return False
    if outcome.is_target_fault:
        return False
    upstream.window_failed += 1
    upstream.last_error = outcome.value
    if outcome is Outcome.PROXY_AUTH_FAILED:
        # Rejected credentials are configuration, not luck: no streak needed.
        upstream.failure_streak = max(upstream.failure_streak + 1, policy.failures_to_eject)
        return upstream.status is HealthStatus.ACTIVE
    if not outcome.counts_against_upstream:
        return False
    upstream.failure_streak += 1
    return (
        upstream.failure_streak >= policy.failures_to_eject
        and upstream.status is HealthStatus.ACTIVE
    )


def ejection_allowed(total: int, ejected: int, policy: HealthPolicy) -> bool:
    """May a pool of `total` upstreams, `ejected` of them out already, eject one more?

    Never beyond `max_ejection_percent` of the pool (rounded down), so a pool of one upstream
    never ejects it: a dead target site, or a network blip, can never empty a pool.
    """
    return ejected + 1 <= math.floor(total * policy.max_ejection_percent / 100.0)


def ejection_end(times_ejected: int, now: float, policy: HealthPolicy) -> float:
    """When an ejection that is the upstream's `times_ejected`-th ends."""
    return now + min(policy.base_ejection_s * max(times_ejected, 1), policy.max_ejection_s)


def in_panic(upstreams: Iterable[Upstream], policy: HealthPolicy) -> bool:
    """True when an active upstream has failed enough to be ejected but was kept: the pool
    has hit its ejection cap and is using upstreams it would rather not."""
    threshold = policy.failures_to_eject
    return any(
        up.status is HealthStatus.ACTIVE and up.failure_streak >= threshold for up in upstreams
    )


def success_rate(upstream: Upstream, now: float, policy: HealthPolicy) -> tuple[float, float]:
    """(success rate, request volume) over the sliding window ending at `now`.

    Two fixed buckets, the current one and the one before, weighted by how much of the previous
    bucket still lies inside the window: a sliding window in five numbers, cheap to keep in a
    database row.
    """
    window = policy.window_s
    start = upstream.window_start
    if start is None:
        return 1.0, 0.0
    elapsed = now - start
    if elapsed >= 2 * window:
        return 1.0, 0.0
    if elapsed >= window:
        carried = 1.0 - (elapsed - window) / window
        ok, failed = upstream.window_ok * carried, upstream.window_failed * carried
    else:
        carried = 1.0 - elapsed / window
        ok = upstream.window_ok + upstream.previous_ok * carried
        failed = upstream.window_failed + upstream.previous_failed * carried
    volume = ok + failed
    return (ok / volume if volume else 1.0), volume


def success_rate_outliers(
    upstreams: Iterable[Upstream], now: float, policy: HealthPolicy
) -> list[Upstream]:
    """Active upstreams whose success rate is far below their pool's (Envoy's rule: below the
    mean by `success_rate_stdev_factor` standard deviations), among those with at least
    `success_rate_min_requests` in the window, when at least `success_rate_min_upstreams`
    have that many."""
    if not policy.success_rate_ejection:
        return []
    rated: list[tuple[Upstream, float]] = []
    for upstream in upstreams:
        if upstream.status is not HealthStatus.ACTIVE:
            continue
        rate, volume = success_rate(upstream, now, policy)
        if volume >= policy.success_rate_min_requests:
            rated.append((upstream, rate))
    if len(rated) < policy.success_rate_min_upstreams:
        return []
    mean = sum(rate for _, rate in rated) / len(rated)
    stdev = math.sqrt(sum((rate - mean) ** 2 for _, rate in rated) / len(rated))
    floor = mean - policy.success_rate_stdev_factor * stdev
    return [upstream for upstream, rate in rated if rate < floor]


def _roll_window(upstream: Upstream, now: float, window: float) -> None:
    start = upstream.window_start
    if start is not None and now - start < window:
        return
    if start is not None and now - start < 2 * window:
        upstream.previous_ok, upstream.previous_failed = upstream.window_ok, upstream.window_failed
        upstream.window_start = start + window
    else:
        upstream.previous_ok = upstream.previous_failed = 0
        upstream.window_start = now
    upstream.window_ok = upstream.window_failed = 0
