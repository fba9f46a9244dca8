"""`bench_core --storage URL`: acquire+release pairs per second on SQL storage, beside pharox.

For each storage URL given (`postgresql://host:port/db`; `sqlite:///` for a temporary file, or
`sqlite:///PATH` for a file at PATH that must not exist yet), proxygate's `LeaseManager` over
`SQLStorage` does pairs on a pool of 32 upstreams, round robin, no concurrency limit: one task
back to back, and 16 tasks each holding its lease across one `asyncio.sleep(0)`. On PostgreSQL,
pharox 0.11 does the same work on the same database through both PostgreSQL adapters it ships
(`loadtest/_pharox_sql.py`, in the benchmark-only virtualenv `loadtest/.bench-venv`, with
pharox's `postgres` and `async` extras; `--no-peer` leaves it out).

Every case runs on a database of its own, made before it and dropped after it: a PostgreSQL
schema (`bench_proxygate_...`, `bench_pharox_...`) or a SQLite file. pharox keeps every
released lease as a row, so a case is bounded by time, not by a count, for both sides: a
warm-up, then `seconds` of pairs; the rate is pairs over the case's wall time. Cases alternate
round by round (proxygate, pharox's two paths; 1 task, then 16), and each figure is the median
of its rounds. Each case reports the CPU share of the process doing the pairs (proxygate's is
this one, pharox's its subprocess; threads add up, so it can pass 100%) and, at most over its
rounds, how busy all cores were (every process: the database server's work shows there, and so
does anyone else's on a shared machine).

The last line: `sql: proxygate N pairs/s, pharox M pairs/s, ratio R (postgres, 16 tasks)`,
where M is the faster of pharox's two paths and `n/a` stands for what was not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg

from core.leasing import LeaseManager
from core.models import LeaseRequest, Pool, Selector
from core.storage.sql import SQLStorage, upgrade
from loadtest.bench_core import (
    ACQUIRE_TIMEOUT,
    HERE,
    PHAROX_SQL_MODULES,
    PHAROX_SQL_REQUIREMENTS,
    POOL,
    build_catalog,
    ensure_bench_venv,
    loop_factory,
    print_table,
    rate_text,
    run_pharox,
    say,
    write_figures,
)

__all__ = ["main"]

PHAROX_SCRIPT = HERE / "_pharox_sql.py"
POOL_SIZE = 32
TASKS = (1, 16)
HEADLINE_TASKS = 16
PHAROX_PATHS = ("manager", "adapter")
TARGET_R = 20.0  # proxygate / pharox on PostgreSQL, 16 tasks: at least
TARGET_N = 2_500.0  # proxygate on PostgreSQL, 16 tasks, pairs/s: at least
#: Beyond its own length, how long a case may take (connecting, building the schema, a
#: subprocess starting) before it is given up as hung.
CASE_SLACK = 90.0
#: Seconds the leases held after a case may take to come back (leases granted ahead).
HELD_AFTER_WAIT = 2.0


@dataclass(frozen=True, slots=True)
class SqlPlan:
    seconds: float
    warmup: float
    rounds: int


FULL = SqlPlan(seconds=5.0, warmup=1.0, rounds=3)
QUICK = SqlPlan(seconds=1.0, warmup=0.25, rounds=1)


@dataclass(frozen=True, slots=True)
class Target:
    """One storage URL of the command line."""

    url: str
    kind: str  # "postgres" or "sqlite"

    @classmethod
    def parse(cls, url: str) -> Target:
        scheme = url.partition("://")[0].lower()
        if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
            return cls(url, "postgres")
        if scheme in ("sqlite", "sqlite+aiosqlite"):
            return cls(url, "sqlite")
        raise SystemExit(f"bench_core: --storage takes postgresql:// or sqlite:/// URLs: {url}")

    def sqlite_path(self) -> Path | None:
        """The file a sqlite URL names (None: a temporary one)."""
        path = self.url.partition("://")[2].removeprefix("/")
        return Path(path) if path else None


def targets_of(values: Sequence[str]) -> list[Target]:
    urls = [url.strip() for value in values for url in value.split(",") if url.strip()]
    return [Target.parse(url) for url in urls]


# -- scratch databases -----------------------------------------------------------------------


def libpq_url(url: str) -> str:
    """`url` as asyncpg takes it: without SQLAlchemy's `+driver` in the scheme."""
    scheme, sep, rest = url.partition("://")
    return scheme.partition("+")[0] + sep + rest


async def make_schema(url: str, prefix: str) -> str:
    name = f"{prefix}_{secrets.token_hex(5)}"
    connection = await asyncpg.connect(libpq_url(url), timeout=10)
    try:
        await connection.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await connection.close()
    return name


async def drop_schema(url: str, name: str) -> None:
    connection = await asyncpg.connect(libpq_url(url), timeout=10)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await connection.close()


@asynccontextmanager
async def scratch_storage(target: Target) -> AsyncIterator[SQLStorage]:
    """An open SQLStorage on a database made for it, migrated, and removed afterwards."""
    schema: str | None = None
    if target.kind == "postgres":
        url = target.url
        schema = await make_schema(url, "bench_proxygate")
    else:
        path, directory = sqlite_file(target)
        url = f"sqlite:///{path}"
    try:
        await upgrade(url, schema=schema)
        storage = SQLStorage(url, schema=schema)
        await storage.open()
        try:
            yield storage
        finally:
            await storage.close()
    finally:
        if schema is not None:
            await drop_schema(url, schema)
        else:
            remove_sqlite(path, directory)


def sqlite_file(target: Target) -> tuple[Path, Path | None]:
    """Where a case's SQLite database goes, and the temporary directory made for it if any."""
    given = target.sqlite_path()
    if given is not None:
        if given.exists():
            raise SystemExit(f"bench_core: {given} exists; give a path the benchmark may create")
        return given, None
    directory = Path(tempfile.mkdtemp(prefix="proxygate-bench-"))
    return directory / "bench.db", directory


def remove_sqlite(path: Path, directory: Path | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# -- measuring -------------------------------------------------------------------------------


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of every core together, from /proc/stat ((0, 0) without it)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of all cores busy between two readings (None when unknown)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


async def timed_pairs(manager: LeaseManager, tasks: int, seconds: float) -> dict[str, Any]:
    request = LeaseRequest(POOL)
    pairs = 0

    async def worker(deadline: float) -> None:
        nonlocal pairs
        while time.perf_counter() < deadline:
            lease = await manager.acquire(request, timeout=ACQUIRE_TIMEOUT)
            if tasks > 1:
                await asyncio.sleep(0)
            await manager.release(lease)
            pairs += 1

    ticks = machine_ticks()
    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker(started + seconds) for _ in range(tasks)))
    elapsed = time.perf_counter() - started
    return {
        "pairs": pairs,
        "seconds": elapsed,
        "rate": pairs / elapsed,
        "cpu_share": (time.process_time() - cpu) / elapsed,
        "machine_share": machine_share(ticks, machine_ticks()),
    }


async def proxygate_case(target: Target, tasks: int, plan: SqlPlan) -> dict[str, Any]:
    async with asyncio.timeout(plan.warmup + plan.seconds + CASE_SLACK):
        async with scratch_storage(target) as storage:
            await storage.add_pool(Pool(POOL, selector=Selector.ROUND_ROBIN))
            catalog, _ = build_catalog(POOL_SIZE)
            await storage.add_upstreams(catalog)
            manager = LeaseManager(storage)
            await timed_pairs(manager, tasks, plan.warmup)
            case = await timed_pairs(manager, tasks, plan.seconds)
            # Every lease given back: what was counted was real pairs. On PostgreSQL, leases
            # granted ahead of requests that never came go back within a moment.
            deadline = time.monotonic() + HELD_AFTER_WAIT
            while (stats := await storage.stats(POOL, time.time())).leases_held:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
    case["leases_held_after"] = stats.leases_held
    return case


def pharox_case(
    python: Path, runner: asyncio.Runner, url: str, path: str, tasks: int, plan: SqlPlan
) -> tuple[dict[str, Any] | None, str]:
    schema = runner.run(make_schema(url, "bench_pharox"))
    command = [str(python), str(PHAROX_SCRIPT), "--url", url, "--schema", schema]
    command += ["--path", path, "--tasks", str(tasks), "--seconds", str(plan.seconds)]
    command += ["--warmup", str(plan.warmup), "--pool-size", str(POOL_SIZE)]
    ticks = machine_ticks()
    try:
        case, why = run_pharox(command, timeout=plan.warmup + plan.seconds + CASE_SLACK)
    finally:
        runner.run(drop_schema(url, schema))
    if case is None:
        return None, why
    # Over the subprocess's whole life (start-up and warm-up too): an upper bound.
    case["machine_share"] = machine_share(ticks, machine_ticks())
    return case, ""


# -- the run ---------------------------------------------------------------------------------


def case_name(side: str, target: Target, tasks: int) -> str:
    return f"{side} {target.kind}, {tasks} task{'s' if tasks > 1 else ''}"


def run_cases(
    targets: Sequence[Target], plan: SqlPlan, pharox_python: Path | None
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Every case's rounds, by name, and why a pharox case was not measured."""
    rounds: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    factory, _ = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        for number in range(plan.rounds):
            for target in targets:
                for tasks in TASKS:
                    name = case_name("proxygate", target, tasks)
                    say(f"[round {number + 1}/{plan.rounds}] {name}")
                    case = runner.run(proxygate_case(target, tasks, plan))
                    rounds.setdefault(name, []).append(case)
                    if target.kind != "postgres" or pharox_python is None:
                        continue
                    for path in PHAROX_PATHS:
                        name = case_name(f"pharox ({path})", target, tasks)
                        if name in failed:
                            continue
                        say(f"[round {number + 1}/{plan.rounds}] {name}")
                        got, why = pharox_case(pharox_python, runner, target.url, path, tasks, plan)
                        if got is None:
                            failed[name] = why
                            say(f"[pharox] NOT MEASURED: {why}")
                        else:
                            rounds.setdefault(name, []).append(got)
    return rounds, failed


def summaries(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per case: the rounds' rates, their median (the figure), the lowest CPU shares."""
    result = {}
    for name, cases in rounds.items():
        shares = [c["machine_share"] for c in cases if c.get("machine_share") is not None]
        result[name] = {
            "rate": statistics.median(c["rate"] for c in cases),
            "rates": [c["rate"] for c in cases],
            "pairs": [c["pairs"] for c in cases],
            "seconds": [c["seconds"] for c in cases],
            "cpu_share": min(c["cpu_share"] for c in cases),
            "machine_share": max(shares) if shares else None,
            "leases_held_after": max(c.get("leases_held_after", 0) for c in cases),
            "path": cases[0].get("path"),
        }
    return result


def headline(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    n = figures.get(f"proxygate postgres, {HEADLINE_TASKS} tasks", {}).get("rate")
    peers = [
        figures[name]["rate"]
        for name in (f"pharox ({path}) postgres, {HEADLINE_TASKS} tasks" for path in PHAROX_PATHS)
        if name in figures
    ]
    m = max(peers) if peers else None
    r = n / m if n is not None and m else None
    return {"N": n, "M": m, "R": r}


def summary_line(top: dict[str, Any]) -> str:
    n = "n/a" if top["N"] is None else f"{top['N']:.0f}"
    m = "n/a" if top["M"] is None else f"{top['M']:.0f}"
    r = "n/a" if top["R"] is None else f"{top['R']:.2f}"
    return (
        f"sql: proxygate {n} pairs/s, pharox {m} pairs/s, ratio {r} "
        f"(postgres, {HEADLINE_TASKS} tasks)"
    )


def note(name: str, summary: dict[str, Any], seconds: float) -> str:
    rates = " / ".join(f"{rate:,.0f}" for rate in summary["rates"])
    machine = summary["machine_share"]
    # Every process counts, the database server's and the benchmark's own included.
    busy = "" if machine is None else f"; all cores busy <= {machine:.0%}"
    held = ""
    if name.startswith("proxygate"):
        held = f"; {summary['leases_held_after']} leases held after"
    return (
        f"median of {rates} ({seconds:g} s each); client process cpu >= "
        f"{summary['cpu_share']:.0%}{busy}{held}"
    )


def report(
    targets: Sequence[Target],
    figures: dict[str, dict[str, Any]],
    failed: dict[str, str],
    plan: SqlPlan,
    peer_note: str,
) -> None:
    rows = []
    for target in targets:
        sides = ["proxygate"]
        if target.kind == "postgres":
            sides += [f"pharox ({path})" for path in PHAROX_PATHS]
        for side in sides:
            for tasks in TASKS:
                name = case_name(side, target, tasks)
                if name in figures:
                    rows.append(
                        (
                            name,
                            rate_text(figures[name]["rate"]),
                            note(name, figures[name], plan.seconds),
                        )
                    )
                else:
                    rows.append((name, "n/a", f"NOT MEASURED: {failed.get(name, peer_note)}"))
    print_table(
        f"SQL storage: pool of {POOL_SIZE} upstreams, round robin, no concurrency limit; "
        f"{'/'.join(map(str, TASKS))} tasks (with more than one, each lease is held across one "
        f"asyncio.sleep(0)); every case on a fresh schema or file; {plan.rounds} round(s)",
        rows,
    )
    for path in PHAROX_PATHS:
        for name, summary in figures.items():
            if name.startswith(f"pharox ({path})") and summary["path"]:
                say(f"  pharox ({path}): {summary['path']}")
                break


def report_targets(top: dict[str, Any]) -> None:
    def verdict(value: float | None, target: float) -> str:
        return "n/a" if value is None else ("PASS" if value >= target else "MISS")

    say("\ntargets")
    r = "n/a" if top["R"] is None else f"{top['R']:.2f}"
    n = "n/a" if top["N"] is None else f"{top['N']:,.0f}"
    say(
        f"  R = proxygate / pharox, postgres, 16 tasks  {r:>8}  >= {TARGET_R:<6g}  "
        + verdict(top["R"], TARGET_R)
    )
    say(
        f"  proxygate, postgres, 16 tasks, pairs/s     {n:>8}  >= {TARGET_N:<6,.0f}  "
        + verdict(top["N"], TARGET_N)
    )


def main(args: argparse.Namespace) -> int:
    targets = targets_of(args.storage)
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        plan = SqlPlan(
            seconds=args.seconds, warmup=min(plan.warmup, args.seconds), rounds=plan.rounds
        )
    _, loop_name = loop_factory()
    started = time.perf_counter()
    say(
        f"bench_core --storage ({'quick' if args.quick else 'full'} run): python "
        f"{platform.python_version()}, event loop {loop_name}, {os.cpu_count()} cores; "
        f"{', '.join(f'{t.kind} {t.url}' for t in targets)}"
    )
    pharox_python: Path | None = None
    peer_note = "left out (--no-peer)"
    if not args.no_peer and any(t.kind == "postgres" for t in targets):
        pharox_python, venv_note = ensure_bench_venv(PHAROX_SQL_REQUIREMENTS, PHAROX_SQL_MODULES)
        peer_note = venv_note
        say(
            f"[pharox] bench venv: {venv_note}"
            if pharox_python
            else f"[pharox] NOT MEASURED: {venv_note}"
        )
    elif not args.no_peer:
        peer_note = "pharox is measured on PostgreSQL only"

    rounds, failed = run_cases(targets, plan, pharox_python)
    figures = summaries(rounds)
    top = headline(figures)
    report(targets, figures, failed, plan, peer_note)
    report_targets(top)
    elapsed = time.perf_counter() - started
    say(f"\nrun took {elapsed:.1f} s; figures are medians of their rounds")
    if args.json is not None:
        document = {
            "targets": [asdict(t) for t in targets],
            "rounds": rounds,
            "figures": figures,
            "not_measured": failed,
            "summary": top,
            "summary_line": summary_line(top),
            "elapsed_seconds": elapsed,
        }
        write_figures(args.json, args, loop_name, plan, document)
    say(summary_line(top))
    return 0
