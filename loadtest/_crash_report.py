"""The crash hunt's report: figures per combination and in total, then every problem."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadtest.crash_hunt import RunResult

__all__ = ["report_lines", "totals"]


def totals(results: list[RunResult]) -> dict[str, object]:
    """The figures of `results` summed: what a line of the report says."""
    faults: Counter[str] = Counter()
    aborts: Counter[str] = Counter()
    fd_deltas: list[int] = []
    task_deltas: list[int] = []
    for result in results:
        faults.update(result.faults)
        aborts.update(result.tally.aborts)
        fd_deltas += result.fd_deltas.values()
        if result.task_delta is not None:
            task_deltas.append(result.task_delta)
    return {
        "runs": len(results),
        "requests": sum(r.tally.requests for r in results),
        "tunnels": sum(r.tally.tunnels for r in results),
        "faults": faults,
        "aborts": aborts,
        "db_restarts": sum(r.db_restarts for r in results),
        "db_outages": sum(r.db_outages for r in results),
        "crashes": sum(len(r.crashes) for r in results),
        # The admin API and the leases table count the same leases: the larger of the two.
        "leaked": sum(max(r.leaked, r.lease_rows or 0) for r in results),
        "fd_max": max(fd_deltas, default=0),
        "task_max": max(task_deltas) if task_deltas else None,
        "problems": sum(len(r.problems) for r in results),
        "seconds": sum(r.seconds for r in results),
    }


def _counts(counter: Counter[str]) -> str:
    if not counter:
        return "none"
    return ", ".join(f"{kind} {n:,}" for kind, n in sorted(counter.items()) if n)


def _block(title: str, results: list[RunResult]) -> list[str]:
    t = totals(results)
    faults, aborts = t["faults"], t["aborts"]
    assert isinstance(faults, Counter)
    assert isinstance(aborts, Counter)
    task = "n/a" if t["task_max"] is None else f"{t['task_max']:+d}"
    return [
        f"{title}: {t['runs']} run(s), {t['seconds']:.0f} s, {t['requests']:,} requests, "
        f"{t['tunnels']:,} tunnels, {sum(faults.values()):,} faults, {sum(aborts.values()):,} "
        f"client aborts, {t['db_restarts']} database restarts ({t['db_outages']} outages), "
        f"crashes {t['crashes']}, leaked leases {t['leaked']}, fd delta max {t['fd_max']:+d}, "
        f"task delta max {task}",
        f"    faults by kind: {_counts(faults)}",
        f"    client aborts: {_counts(aborts)}",
    ]


def report_lines(results: list[RunResult]) -> tuple[list[str], bool]:
    """The report, and whether anything failed."""
    lines = [""]
    seen: list[str] = []
    for result in results:
        if result.combination not in seen:
            seen.append(result.combination)
    for combination in seen:
        lines += _block(combination, [r for r in results if r.combination == combination])
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for result in results:
        statuses.update(result.tally.statuses)
        errors.update(result.tally.errors)
    lines.append(f"answers clients got (not judged): {_counts(statuses)}")
    lines.append(f"client-side errors (not judged): {_counts(errors)}")
    failed = False
    for result in results:
        for crash in result.crashes:
            failed = True
            where = f"{result.combination} run {result.index}"
            lines.append(f"CRASH {where}: {crash} (log {result.log})")
        for problem in result.problems:
            failed = True
            lines.append(f"FAILED {result.combination} run {result.index}: {problem}")
    t = totals(results)
    faults = t["faults"]
    assert isinstance(faults, Counter)
    lines.append(
        f"crash-hunt: {t['runs']} runs, {t['requests']:,} requests, {t['tunnels']:,} tunnels, "
        f"{sum(faults.values()):,} faults, {t['db_restarts']} database restarts, crashes "
        f"{t['crashes']}, leaked leases {t['leaked']}: {'FAILED' if failed else 'passed'}"
    )
    return lines, failed
