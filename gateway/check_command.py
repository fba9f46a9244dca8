"""`proxygate check`: the active-check pipeline once over the configured upstreams."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TextIO

from config import HttpUpstreamMode, Settings
from core.checks import CheckContext, CheckReport, run_pipeline
from core.models import Upstream
from gateway.checkers import build_checkers, learn_real_ip
from gateway.dial import DialPolicy

__all__ = ["run_check"]

_BAR_WIDTH = 30


async def run_check(
    settings: Settings, pool: str | None, *, as_json: bool, out: TextIO, err: TextIO
) -> int:
    """Check every upstream (of `pool`, or of all pools); 0 when all pass, 1 otherwise, 2
    when there is nothing to check."""
    pools = [p for p in settings.pools if pool is None or p.name == pool]
    if pool is not None and not pools:
        names = ", ".join(p.name for p in settings.pools) or "none"
        print(f"proxygate: no pool is named {pool!r} (pools: {names})", file=err)
        return 2
    upstreams = [upstream for p in pools for upstream in p.to_upstreams()]
    if not upstreams:
        print("proxygate: no upstreams to check", file=err)
        return 2
    checks = settings.checks
    checkers = build_checkers(
        checks,
        DialPolicy(deny=settings.gateway.deny_destinations),
        http_tunnels=settings.gateway.http_upstream_mode is HttpUpstreamMode.CONNECT,
    )
    real_ip = None
    if checks.judge_url is not None:
        real_ip = await learn_real_ip(checks.judge_url, checks.timeout)
    slots = asyncio.Semaphore(checks.concurrency)
    progress = _Progress(len(upstreams), err)

    async def check(upstream: Upstream) -> CheckReport:
        async with slots:
            report = await run_pipeline(checkers, upstream, CheckContext(real_ip))
        progress.advance(report.passed)
        return report

    reports = await asyncio.gather(*(check(upstream) for upstream in upstreams))
    progress.finish()
    rows = [_row(report) for report in reports]
    if as_json:
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        _print_table(rows, out)
    return 0 if all(report.passed for report in reports) else 1


def _row(report: CheckReport) -> dict[str, Any]:
    upstream = report.upstream
    failure = report.failure
    latency = report.latency
    return {
        "id": upstream.id,
        "pool": upstream.pool,
        "address": upstream.endpoint.redacted(),
        "status": "pass" if report.passed else "fail",
        "exit_ip": report.context.exit_ip,
        "latency_ms": None if latency is None else round(latency * 1000, 1),
        "anonymity": report.context.anonymity,
        "failed_stage": None if failure is None else failure[0],
        "outcome": None if failure is None else failure[1].outcome.value,
        "reason": None if failure is None else failure[1].detail,
    }


_COLUMNS = (
    ("UPSTREAM", "id"),
    ("ADDRESS", "address"),
    ("STATUS", "status"),
    ("EXIT IP", "exit_ip"),
    ("LATENCY", "latency_ms"),
    ("ANONYMITY", "anonymity"),
    ("FAILED STAGE", "failed_stage"),
    ("REASON", "reason"),
)


def _print_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    cells = [[title for title, _ in _COLUMNS]]
    for row in rows:
        line = []
        for _, key in _COLUMNS:
            value = row[key]
            if key == "latency_ms" and value is not None:
                value = f"{value:.1f} ms"
            line.append("-" if value is None else str(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    for line in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        out.write("\n")
    passed = sum(1 for row in rows if row["status"] == "pass")
    out.write(f"\n{passed} of {len(rows)} upstreams passed\n")


class _Progress:
    """A one-line bar on stderr, redrawn in place."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.failed = 0

    def advance(self, passed: bool) -> None:
        self.done += 1
        self.failed += not passed
        filled = _BAR_WIDTH * self.done // self.total
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        self.stream.write(f"\rchecking [{bar}] {self.done}/{self.total}, {self.failed} failed")
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
