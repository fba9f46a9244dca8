"""Active checks: a pipeline of checkers in stages, and the scheduler that runs it.

Checkers do their own I/O (the gateway provides the built-in ones); this module only orders
them, bounds them in time, and turns their verdicts into health through the lease manager.
Stages run in order, the checkers of one stage at once; the first stage with a failure ends the
pipeline. Later stages read what earlier ones learnt from the shared `CheckContext`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import groupby
from typing import Protocol

from core import health
from core.errors import StorageUnavailable
from core.health import RecordSource
from core.leasing import LeaseManager
from core.models import HealthPolicy, HealthStatus, Outcome, Upstream

__all__ = [
    "CheckContext",
    "CheckReport",
    "CheckResult",
    "CheckScheduler",
    "Checker",
    "run_pipeline",
]

log = logging.getLogger("proxygate.checks")


@dataclass(slots=True)
class CheckContext:
    """What the stages learnt of one upstream, for the stages after them and the report."""

    #: The caller's own address as the judge saw it without any upstream (for anonymity).
    real_ip: str | None = None
    exit_ip: str | None = None
    tcp_latency: float | None = None
    #: Seconds for the judge's answer through the upstream.
    latency: float | None = None
    #: "transparent", "anonymous" or "elite".
    anonymity: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class CheckResult:
    passed: bool
    #: What health hears: OK, or how the upstream failed (target-side outcomes count nothing).
    outcome: Outcome = Outcome.OK
    latency: float | None = None
    detail: str = ""

    @classmethod
    def ok(cls, latency: float | None = None, detail: str = "") -> CheckResult:
        return cls(True, Outcome.OK, latency, detail)

    @classmethod
    def failed(cls, outcome: Outcome, detail: str) -> CheckResult:
        return cls(False, outcome, None, detail)


class Checker(Protocol):
    name: str
    #: Stages run in ascending order.
    stage: int
    #: Within a stage, the lower first in the report (and the failure named).
    priority: int
    #: Seconds the check may take; beyond it, it fails as a timeout.
    timeout: float

    def should_skip(self, upstream: Upstream) -> bool: ...

    async def check(self, upstream: Upstream, context: CheckContext) -> CheckResult: ...


@dataclass(slots=True, frozen=True)
class CheckReport:
    upstream: Upstream
    context: CheckContext
    #: (checker name, result), in the order they ran.
    results: tuple[tuple[str, CheckResult], ...]

    @property
    def passed(self) -> bool:
        return all(result.passed for _, result in self.results)

    @property
    def failure(self) -> tuple[str, CheckResult] | None:
        """The first failing checker and its result."""
        return next(((name, r) for name, r in self.results if not r.passed), None)

    @property
    def latency(self) -> float | None:
        return self.context.latency or self.context.tcp_latency


async def run_pipeline(
    checkers: Sequence[Checker], upstream: Upstream, context: CheckContext | None = None
) -> CheckReport:
    context = CheckContext() if context is None else context
    results: list[tuple[str, CheckResult]] = []
    ordered = sorted(checkers, key=lambda c: (c.stage, c.priority))
    for _, stage in groupby(ordered, key=lambda c: c.stage):
        running = [c for c in stage if not c.should_skip(upstream)]
        if not running:
            continue
        verdicts = await asyncio.gather(*(_run_one(c, upstream, context) for c in running))
        results.extend((c.name, verdict) for c, verdict in zip(running, verdicts, strict=True))
        if not all(verdict.passed for verdict in verdicts):
            break
    return CheckReport(upstream, context, tuple(results))


async def _run_one(checker: Checker, upstream: Upstream, context: CheckContext) -> CheckResult:
    try:
        async with asyncio.timeout(checker.timeout):
            return await checker.check(upstream, context)
    except TimeoutError:
        return CheckResult.failed(
            Outcome.CONNECT_TIMEOUT, f"no answer within {checker.timeout:g}s"
        )
    except Exception as exc:  # a checker's bug must not stop the others
        log.exception("checker %s failed on %s", checker.name, upstream.id)
        return CheckResult.failed(Outcome.PROXY_ERROR, f"checker error: {exc!r}")


class CheckScheduler:
    """Runs the pipeline over a manager's pools: ejected upstreams every `ejected_interval`
    (to re-admit them as soon as they pass), new ones at once, every one every `interval`; at
    most `concurrency` at a time. Also ejects success-rate outliers where a pool asks for it.

    `run_once()` does one round and returns its reports: the background task calls it every
    `tick` seconds, tests call it after stepping the clock.
    """

    def __init__(
        self,
        manager: LeaseManager,
        checkers: Sequence[Checker],
        *,
        interval: float = 300.0,
        ejected_interval: float = 10.0,
        concurrency: int = 16,
        tick: float = 5.0,
        real_ip: str | None = None,
    ) -> None:
        self.manager = manager
        self.checkers = tuple(checkers)
        self.interval = interval
        self.ejected_interval = min(ejected_interval, interval)
        self.tick = tick
        self.real_ip = real_ip
        self._concurrency = concurrency
        self._checked_at: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run_forever(), name="health-checks")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> list[CheckReport]:
        now = self.manager.clock.now()
        due: list[Upstream] = []
        seen: set[str] = set()
        for pool in await self.manager.pools():
            upstreams = await self.manager.upstreams(pool.name)
            await self._eject_outliers(pool.health, upstreams, now)
            for upstream in upstreams:
                seen.add(upstream.id)
                if self._is_due(upstream, now):
                    due.append(upstream)
        for gone in self._checked_at.keys() - seen:
            del self._checked_at[gone]
        for upstream in due:
            self._checked_at[upstream.id] = now
        # A fixed set of workers over the due list, not a task per upstream: a pool of 100,000
        # new upstreams must not become 100,000 tasks at once.
        reports: list[CheckReport] = []
        pending = iter(due)

        async def work() -> None:
            for upstream in pending:
                reports.append(await self._check(upstream))

        await asyncio.gather(*(work() for _ in range(min(self._concurrency, len(due)))))
        return reports

    def _is_due(self, upstream: Upstream, now: float) -> bool:
        last = self._checked_at.get(upstream.id)
        if last is None:
            return True
        every = self.ejected_interval if upstream.status is HealthStatus.EJECTED else self.interval
        return now - last >= every

    async def _check(self, upstream: Upstream) -> CheckReport:
        report = await run_pipeline(self.checkers, upstream, CheckContext(self.real_ip))
        await self.record(report)
        return report

    async def record(self, report: CheckReport) -> None:
        """Feed a report into health: a pass re-admits an ejected upstream."""
        upstream = report.upstream
        failure = report.failure
        if failure is None:
            update = await self.manager.report(
                upstream.id, Outcome.OK, report.latency, source=RecordSource.CHECK
            )
            if update.upstream.status is HealthStatus.EJECTED:
                await self.manager.readmit(upstream.id)
            return
        name, result = failure
        await self.manager.report(
            upstream.id,
            result.outcome,
            None,
            source=RecordSource.CHECK,
            detail=f"{name}: {result.detail}",
        )

    async def _eject_outliers(
        self, policy: HealthPolicy, upstreams: Iterable[Upstream], now: float
    ) -> None:
        members = list(upstreams)
        outliers = health.success_rate_outliers(members, now, policy)
        ejected = sum(1 for up in members if up.status is HealthStatus.EJECTED)
        for upstream in outliers:
            if not health.ejection_allowed(len(members), ejected, policy):
                break
            until = health.ejection_end(upstream.times_ejected + 1, now, policy)
            await self.manager.eject(upstream.id, until)
            ejected += 1
            log.warning(
                "upstream %s ejected for %gs: its success rate is far below its pool's",
                upstream.id,
                until - now,
            )

    async def _run_forever(self) -> None:
        while True:
            try:
                await self.run_once()
            except StorageUnavailable as error:
                log.warning("health check round skipped: %s", error)
            except Exception:
                log.exception("health check round failed; trying again in %gs", self.tick)
            await asyncio.sleep(self.tick)
