"""Throughput of the leasing core, in acquire+release pairs per second, beside pharox 0.11.

One run (`python -m loadtest.bench_core`, or `python loadtest/bench_core.py`) measures:

1. Headline. proxygate's `LeaseManager` over `MemoryStorage`, a pool of 32 upstreams, round
   robin, no concurrency limit (the default): (a) one task doing pairs back to back; (b) 64
   tasks doing pairs, each holding its lease across one event-loop turn (`asyncio.sleep(0)`)
   so that 64 leases are really out at once. For information, the same 64 tasks with
   `max_concurrency=1`: half of them wait in line and every release hands over to a waiter.
2. pharox 0.11 on the same work (pool of 32, round robin, 1 task and 64 tasks), through the
   async path pharox ships (`acquire_proxy_async`/`release_proxy_async`; see
   `loadtest/_pharox_core.py`). pharox is no dependency of proxygate: it lives in a
   benchmark-only virtualenv, `loadtest/.bench-venv`, made on first run, and runs there as a
   subprocess. Its store keeps every past lease and slows down as it runs, so each of its cases
   is bounded by time and starts on a fresh store; its rate is pairs over the whole run.
3. Pool size. One task, round robin, at 100, 10,000 and 100,000 upstreams, in interleaved
   rounds. C = rate at 100 / rate at 100,000: what one pair costs at 100k relative to 100.
   The other selectors at 100 and 100,000, for information.
4. Drift. 1,000,000 sequential pairs (pool 32, round robin) on a fresh manager, timed tenth by
   tenth; a run's D = rate over its last 10% of pairs / rate over its first 10%. Five such runs
   (three with --quick); the D reported is their median, because this machine's own noise
   (tenths of one run differ by up to +-30%) is of the order of the effect. Each run also
   reports, free of timing noise, the leases still held and the growth in gc-tracked objects
   after its million pairs.

Every proxygate figure is the median of its rounds (each round is listed in --json). Each
section warms up first and starts after gc.collect(); the garbage collector stays on while
timed, as in production. Rates use time.perf_counter; time.process_time is read beside it, to
show how much of a core each timed run really had (a low share means other processes took the
CPU, and the run's figure carries that noise) and to give C and D a CPU-time cross-check.
Building the catalog and the bulk add are timed apart and printed, never counted in a rate.
Nothing connects anywhere: upstream URLs are only data.

The last line printed is the summary:
`core: proxygate N pairs/s, pharox M pairs/s, ratio R; 100k/100 pool cost ratio C; drift D`.

`--storage URL` runs the SQL section instead (see `loadtest/_bench_sql.py`): acquire+release
on PostgreSQL or SQLite at 1 and 16 tasks, beside pharox's PostgreSQL adapters; its last line
is `sql: proxygate N pairs/s, pharox M pairs/s, ratio R (postgres, 16 tasks)`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.leasing import LeaseManager
from core.models import LeaseRequest, Pool, Selector, Upstream
from core.storage.memory import MemoryStorage

POOL = "bench"
HEADLINE_POOL_SIZE = 32
TASKS = 64
ACQUIRE_TIMEOUT = 5.0
OTHER_SELECTORS = (
    Selector.FIRST_AVAILABLE,
    Selector.LEAST_USED,
    Selector.RANDOM,
    Selector.LOWEST_LATENCY,
    Selector.WEIGHTED,
)
TARGET_R = 100.0  # proxygate / pharox, one task: at least
TARGET_C = 1.5  # cost at 100,000 upstreams / cost at 100: at most
TARGET_D = 0.9  # rate over the last 10% / rate over the first 10%: at least

HERE = Path(__file__).resolve().parent
BENCH_VENV = HERE / ".bench-venv"
PHAROX_SCRIPT = HERE / "_pharox_core.py"
PHAROX_REQUIREMENTS = ("pharox==0.11.0", "uvloop")
#: What `--storage` needs beside: pharox's PostgreSQL adapters and their drivers.
PHAROX_SQL_REQUIREMENTS = ("pharox[postgres,async]==0.11.0", "uvloop")
PHAROX_SQL_MODULES = ("psycopg", "asyncpg", "sqlalchemy", "greenlet")
PHAROX_VERSION = "0.11.0"

#: Below this share of CPU over wall time, other processes took the CPU during a timed run.
BUSY_CPU_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class Timing:
    """What one timed run took: wall-clock seconds (every rate uses these) and CPU seconds."""

    wall: float
    cpu: float

    @property
    def cpu_share(self) -> float:
        return self.cpu / self.wall


class Stopwatch:
    """time.perf_counter for the figures, time.process_time to tell when the machine was busy."""

    __slots__ = ("_cpu", "_wall")

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def stop(self) -> Timing:
        return Timing(time.perf_counter() - self._wall, time.process_time() - self._cpu)


#: Runs `pairs` acquire+release pairs and returns what they took.
Timed = Callable[[int], Awaitable[Timing]]


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    scale_rounds: int
    headline_pairs: int
    pairs_per_task: int
    scale_pairs: int
    selector_pairs: int
    selector_rounds: int
    drift_pairs: int
    drift_runs: int
    pharox_seconds: float
    pharox_warmup: float
    pool_sizes: tuple[int, ...] = (100, 10_000, 100_000)


FULL = Plan(
    rounds=3,
    scale_rounds=5,
    headline_pairs=200_000,
    pairs_per_task=3_000,
    scale_pairs=200_000,
    selector_pairs=100_000,
    selector_rounds=2,
    drift_pairs=1_000_000,
    drift_runs=5,
    pharox_seconds=5.0,
    pharox_warmup=0.25,
)
QUICK = Plan(
    rounds=3,
    scale_rounds=3,
    headline_pairs=10_000,
    pairs_per_task=150,
    scale_pairs=10_000,
    selector_pairs=5_000,
    selector_rounds=1,
    drift_pairs=50_000,
    drift_runs=3,
    pharox_seconds=1.0,
    pharox_warmup=0.1,
)


def say(message: str) -> None:
    print(message, flush=True)


# -- proxygate: workloads --------------------------------------------------------------------


def upstream_url(i: int) -> str:
    """A distinct, valid address per index (10.0.0.1, 10.0.0.2, ...); never connected to."""
    return f"http://10.{i // 62_500}.{i // 250 % 250}.{i % 250 + 1}:8080"


def build_catalog(size: int) -> tuple[list[Upstream], float]:
    """`size` upstreams of pool `bench`, and the seconds it took to build them."""
    started = time.perf_counter()
    upstreams = [Upstream.from_url(upstream_url(i), POOL) for i in range(size)]
    return upstreams, time.perf_counter() - started


async def make_manager(
    upstreams: Sequence[Upstream], selector: Selector, max_concurrency: int | None = None
) -> tuple[LeaseManager, float]:
    """A manager over a fresh MemoryStorage holding `upstreams`, and the bulk-add seconds.

    The same (read-only here) Upstream objects may be added to several storages: each storage
    keeps its own leasing state for them.
    """
    storage = MemoryStorage()
    await storage.add_pool(Pool(POOL, selector=selector, max_concurrency=max_concurrency))
    started = time.perf_counter()
    await storage.add_upstreams(upstreams)
    return LeaseManager(storage), time.perf_counter() - started


async def sequential(manager: LeaseManager, request: LeaseRequest, pairs: int) -> Timing:
    watch = Stopwatch()
    for _ in range(pairs):
        lease = await manager.acquire(request, timeout=ACQUIRE_TIMEOUT)
        await manager.release(lease)
    return watch.stop()


async def concurrent(
    manager: LeaseManager, request: LeaseRequest, tasks: int, pairs: int
) -> Timing:
    """`pairs` pairs split over `tasks` tasks, each holding its lease across one loop turn."""

    async def worker(count: int) -> None:
        for _ in range(count):
            lease = await manager.acquire(request, timeout=ACQUIRE_TIMEOUT)
            await asyncio.sleep(0)
            await manager.release(lease)

    watch = Stopwatch()
    await asyncio.gather(*(worker(pairs // tasks) for _ in range(tasks)))
    return watch.stop()


async def interleaved(cases: dict[str, Timed], pairs: int, rounds: int) -> dict[str, Any]:
    """Warm each case up, then time them in alternating rounds; a `rounds_summary` per case."""
    for run in cases.values():
        await run(max(1_000, pairs // 10))
    timings: dict[str, list[Timing]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            gc.collect()
            timings[name].append(await run(pairs))
    return {name: rounds_summary(values, pairs) for name, values in timings.items()}


def rounds_summary(timings: Sequence[Timing], pairs: int) -> dict[str, Any]:
    """Pairs/s of each round on the wall clock, their median (the figure), and the CPU view."""
    rates = [pairs / t.wall for t in timings]
    cpu_rates = [pairs / t.cpu for t in timings]
    return {
        "pairs": pairs,
        "rates": rates,
        "rate": median(rates),
        "cpu_rates": cpu_rates,
        "cpu_rate": median(cpu_rates),
        "cpu_shares": [t.cpu_share for t in timings],
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- proxygate: sections ---------------------------------------------------------------------


async def headline(plan: Plan) -> dict[str, Any]:
    catalog, _ = build_catalog(HEADLINE_POOL_SIZE)
    request = LeaseRequest(POOL)
    free, _ = await make_manager(catalog, Selector.ROUND_ROBIN)
    limited, _ = await make_manager(catalog, Selector.ROUND_ROBIN, max_concurrency=1)
    gc.collect()
    one = await interleaved(
        {"1_task": partial(sequential, free, request)}, plan.headline_pairs, plan.rounds
    )
    many = await interleaved(
        {
            "64_tasks": partial(concurrent, free, request, TASKS),
            "64_tasks_limit_1": partial(concurrent, limited, request, TASKS),
        },
        plan.pairs_per_task * TASKS,
        plan.rounds,
    )
    return {"pool_size": HEADLINE_POOL_SIZE, "selector": "round_robin", "cases": one | many}


def by_size(cases: dict[str, Any]) -> dict[int, Any]:
    return {int(size): summary for size, summary in cases.items()}


def cost_ratios(sizes: dict[int, Any]) -> dict[str, float]:
    """Rate at the smallest pool over rate at the largest, on wall and on CPU time."""
    small, large = sizes[min(sizes)], sizes[max(sizes)]
    return {
        "cost_ratio": small["rate"] / large["rate"],
        "cpu_cost_ratio": small["cpu_rate"] / large["cpu_rate"],
    }


async def pool_scale(plan: Plan, catalogs: dict[int, list[Upstream]]) -> dict[str, Any]:
    request = LeaseRequest(POOL)
    cases: dict[str, Timed] = {}
    add_seconds: dict[int, float] = {}
    for size in plan.pool_sizes:
        manager, add_seconds[size] = await make_manager(catalogs[size], Selector.ROUND_ROBIN)
        cases[str(size)] = partial(sequential, manager, request)
    gc.collect()
    sizes = by_size(await interleaved(cases, plan.scale_pairs, plan.scale_rounds))
    return {
        "selector": "round_robin",
        "add_seconds": add_seconds,
        "sizes": sizes,
        **cost_ratios(sizes),
    }


async def selector_table(plan: Plan, catalogs: dict[int, list[Upstream]]) -> dict[str, Any]:
    request = LeaseRequest(POOL)
    compared = (min(plan.pool_sizes), max(plan.pool_sizes))
    table: dict[str, Any] = {}
    for selector in OTHER_SELECTORS:
        cases: dict[str, Timed] = {}
        for size in compared:
            manager, _ = await make_manager(catalogs[size], selector)
            cases[str(size)] = partial(sequential, manager, request)
        gc.collect()
        sizes = by_size(await interleaved(cases, plan.selector_pairs, plan.selector_rounds))
        table[selector.value] = {"sizes": sizes, **cost_ratios(sizes)}
        del cases
        gc.collect()
    return {"rounds": plan.selector_rounds, "sizes": compared, "selectors": table}


async def drift_run(pairs: int, chunks: int) -> dict[str, Any]:
    """One long sequential run on a fresh manager, timed tenth by tenth."""
    catalog, _ = build_catalog(HEADLINE_POOL_SIZE)
    manager, _ = await make_manager(catalog, Selector.ROUND_ROBIN)
    request = LeaseRequest(POOL)
    await sequential(manager, request, max(1_000, pairs // 20))  # warm-up
    gc.collect()
    objects_before = len(gc.get_objects())
    chunk = pairs // chunks
    timings = [await sequential(manager, request, chunk) for _ in range(chunks)]
    gc.collect()
    stats = await manager.stats(POOL)
    rates = [chunk / t.wall for t in timings]
    cpu_rates = [chunk / t.cpu for t in timings]
    return {
        "pairs": chunk * chunks,
        "chunk_rates": rates,
        "overall_rate": chunk * chunks / sum(t.wall for t in timings),
        "drift": rates[-1] / rates[0],
        "chunk_cpu_rates": cpu_rates,
        "cpu_drift": cpu_rates[-1] / cpu_rates[0],
        "cpu_shares": [t.cpu_share for t in timings],
        # Evidence free of timing noise of what a run leaves behind.
        "gc_objects_growth": len(gc.get_objects()) - objects_before,
        "leases_held_after": stats.leases_held,
        "total_leases_after": stats.total_leases,
    }


async def drift(plan: Plan, chunks: int = 10) -> dict[str, Any]:
    """`drift_runs` separate runs; D is the median of their last/first-tenth ratios."""
    runs = []
    for _ in range(plan.drift_runs):
        runs.append(await drift_run(plan.drift_pairs, chunks))
        gc.collect()
    return {
        "pairs": runs[0]["pairs"],
        "runs": runs,
        "drift": median([run["drift"] for run in runs]),
        "cpu_drift": median([run["cpu_drift"] for run in runs]),
    }


def cpu_shares(ours: dict[str, Any]) -> list[float]:
    """The CPU share of every timed proxygate run, sections together."""
    summaries = [
        *ours["headline"]["cases"].values(),
        *ours["pool_scale"]["sizes"].values(),
        *(s for entry in ours["selectors"]["selectors"].values() for s in entry["sizes"].values()),
        *ours["drift"]["runs"],
    ]
    return [share for summary in summaries for share in summary["cpu_shares"]]


async def measure_proxygate(plan: Plan) -> dict[str, Any]:
    say(f"[proxygate] headline: pool {HEADLINE_POOL_SIZE}, round robin, 1 and {TASKS} tasks")
    top = await headline(plan)

    say(f"[proxygate] building catalogs of {', '.join(f'{s:,}' for s in plan.pool_sizes)}")
    catalogs: dict[int, list[Upstream]] = {}
    build_seconds: dict[int, float] = {}
    for size in plan.pool_sizes:
        catalogs[size], build_seconds[size] = build_catalog(size)
    say("[proxygate] pool size, round robin, interleaved rounds")
    scale = await pool_scale(plan, catalogs)
    scale["build_seconds"] = build_seconds
    scale["pairs_per_round"] = plan.scale_pairs

    say(f"[proxygate] other selectors at {min(plan.pool_sizes):,} and {max(plan.pool_sizes):,}")
    selectors = await selector_table(plan, catalogs)
    del catalogs
    gc.collect()

    say(f"[proxygate] drift: {plan.drift_runs} runs of {plan.drift_pairs:,} sequential pairs")
    return {
        "headline": top,
        "pool_scale": scale,
        "selectors": selectors,
        "drift": await drift(plan),
    }


# -- pharox, in its own virtualenv -----------------------------------------------------------


def bench_python() -> Path:
    if os.name == "nt":
        return BENCH_VENV / "Scripts" / "python.exe"
    return BENCH_VENV / "bin" / "python"


def shown(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it."""
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return str(path)


def isolated_env() -> dict[str, str]:
    """The environment without anything that would let the venv see this project."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def has_pharox(python: Path, modules: Sequence[str] = ()) -> bool:
    """pharox (and uvloop, and `modules`) importable by the bench venv's `python`."""
    if not python.exists():
        return False
    imports = "".join(f"import {name}; " for name in ("uvloop", *modules))
    probe = imports + "from importlib.metadata import version; print(version('pharox'))"
    done = subprocess.run(
        [str(python), "-c", probe],
        capture_output=True,
        text=True,
        env=isolated_env(),
        check=False,
        timeout=60,
    )
    return done.returncode == 0 and done.stdout.strip() == PHAROX_VERSION


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def ensure_bench_venv(
    requirements: Sequence[str] = PHAROX_REQUIREMENTS, modules: Sequence[str] = ()
) -> tuple[Path | None, str]:
    """The bench venv's python with `requirements` installed (checked by importing pharox,
    uvloop and `modules`), or None and why not."""
    python = bench_python()
    if has_pharox(python, modules):
        return python, f"found in {shown(BENCH_VENV)}"
    say(f"[pharox] creating {shown(BENCH_VENV)} and installing {' '.join(requirements)}")
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    pip += ["--retries", "2", "--timeout", "20", *requirements]
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(BENCH_VENV)],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
        subprocess.run(
            pip, capture_output=True, text=True, check=True, timeout=900, env=isolated_env()
        )
    except subprocess.CalledProcessError as exc:
        return None, f"{Path(exc.cmd[0]).name} {' '.join(exc.cmd[1:4])} failed: " + last_line(
            exc.stderr or exc.stdout or ""
        )
    except subprocess.TimeoutExpired as exc:
        return None, f"{' '.join(map(str, exc.cmd[1:4]))} timed out after {exc.timeout:g} s"
    except OSError as exc:
        return None, f"could not create the bench venv: {exc}"
    if not has_pharox(python, modules):
        return None, f"pharox {PHAROX_VERSION} is still not importable after pip install"
    return python, f"installed into {shown(BENCH_VENV)}"


def measure_pharox(python: Path, plan: Plan) -> tuple[dict[str, Any] | None, str]:
    say(
        f"[pharox] pool {HEADLINE_POOL_SIZE}, round robin, 1 and {TASKS} tasks, "
        f"{plan.pharox_seconds:g} s per case"
    )
    command = [
        str(python),
        str(PHAROX_SCRIPT),
        "--seconds",
        str(plan.pharox_seconds),
        "--warmup",
        str(plan.pharox_warmup),
        "--pool-size",
        str(HEADLINE_POOL_SIZE),
        "--tasks",
        str(TASKS),
    ]
    gc.collect()
    return run_pharox(command, timeout=120 + 6 * plan.pharox_seconds)


def run_pharox(command: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run a pharox script in the bench venv: the JSON it printed last, or None and why not."""
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=isolated_env(),
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        return None, f"the pharox run timed out after {exc.timeout:g} s"
    if done.returncode != 0:
        return None, f"the pharox run failed: {last_line(done.stderr)}"
    try:
        return json.loads(last_line(done.stdout)), ""
    except json.JSONDecodeError:
        return None, f"the pharox run printed no JSON: {last_line(done.stdout)}"


# -- report ----------------------------------------------------------------------------------


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop, "asyncio (uvloop not installed)"
    return uvloop.new_event_loop, f"uvloop {version('uvloop')}"


def verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "n/a"
    met = value >= target if at_least else value <= target
    return "PASS" if met else "MISS"


def summarize(ours: dict[str, Any], pharox: dict[str, Any] | None) -> dict[str, Any]:
    n = ours["headline"]["cases"]["1_task"]["rate"]
    m = pharox["cases"]["async_1_task"]["rate"] if pharox else None
    r = n / m if m else None
    c = ours["pool_scale"]["cost_ratio"]
    d = ours["drift"]["drift"]
    shares = cpu_shares(ours)
    return {
        "N": n,
        "M": m,
        "R": r,
        "C": c,
        "D": d,
        "targets": {
            "R": {"at_least": TARGET_R, "verdict": verdict(r, TARGET_R, True)},
            "C": {"at_most": TARGET_C, "verdict": verdict(c, TARGET_C, False)},
            "D": {"at_least": TARGET_D, "verdict": verdict(d, TARGET_D, True)},
        },
        "cross_checks_on_cpu_time": {
            "C": ours["pool_scale"]["cpu_cost_ratio"],
            "D": ours["drift"]["cpu_drift"],
        },
        "cpu_share": {"lowest": min(shares), "median": median(shares)},
        "machine_busy": min(shares) < BUSY_CPU_SHARE,
    }


def summary_line(summary: dict[str, Any]) -> str:
    m = "n/a" if summary["M"] is None else f"{summary['M']:.0f}"
    r = "n/a" if summary["R"] is None else f"{summary['R']:.2f}"
    return (
        f"core: proxygate {summary['N']:.0f} pairs/s, pharox {m} pairs/s, ratio {r}; "
        f"100k/100 pool cost ratio {summary['C']:.2f}; drift {summary['D']:.2f}"
    )


def rate_text(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:,.0f}"


def rounds_text(summary: dict[str, Any]) -> str:
    """The rounds behind a median, and the lowest CPU share among them."""
    rates = " / ".join(f"{rate:,.0f}" for rate in summary["rates"])
    return (
        f"median of {rates} ({summary['pairs']:,} pairs each); "
        f"cpu share >= {min(summary['cpu_shares']):.0%}"
    )


def print_table(title: str, rows: Sequence[tuple[str, str, str]]) -> None:
    say(f"\n{title}")
    width = max(len(case) for case, _, _ in rows)
    rate_width = max(10, *(len(rate) for _, rate, _ in rows))
    say(f"  {'case':<{width}}  {'pairs/s':>{rate_width}}  notes")
    for case, rate, note in rows:
        say(f"  {case:<{width}}  {rate:>{rate_width}}  {note}".rstrip())


def pharox_rows(pharox: dict[str, Any] | None, why: str) -> list[tuple[str, str, str]]:
    if pharox is None:
        return [("pharox 0.11", "n/a", f"NOT MEASURED: {why}")]
    labels = {
        "async_1_task": "pharox, 1 task",
        f"async_{TASKS}_tasks": f"pharox, {TASKS} tasks",
        "sync_1_thread": "pharox, sync ProxyManager (reference)",
    }
    rows = []
    for name, case in pharox["cases"].items():
        window = case["window_seconds"]
        rows.append(
            (
                labels.get(name, name),
                rate_text(case["rate"]),
                f"{case['pairs']:,} pairs in {case['seconds']:.1f} s; first {window:.1f} s "
                f"{case['first_window_rate']:,.0f}/s, last {window:.1f} s "
                f"{case['last_window_rate']:,.0f}/s; cpu share {case['cpu_share']:.0%}",
            )
        )
    return rows


def report_headline(ours: dict[str, Any], pharox: dict[str, Any] | None, why: str) -> None:
    cases = ours["headline"]["cases"]
    rows = [
        ("proxygate, 1 task", rate_text(cases["1_task"]["rate"]), rounds_text(cases["1_task"])),
        (
            f"proxygate, {TASKS} tasks",
            rate_text(cases["64_tasks"]["rate"]),
            rounds_text(cases["64_tasks"]),
        ),
        (
            f"proxygate, {TASKS} tasks, max_concurrency=1",
            rate_text(cases["64_tasks_limit_1"]["rate"]),
            f"informative: 64 tasks on 32 slots, waiters served in line; "
            f"{rounds_text(cases['64_tasks_limit_1'])}",
        ),
        *pharox_rows(pharox, why),
    ]
    print_table(
        f"1. pool of {HEADLINE_POOL_SIZE} upstreams, round robin, max_concurrency unlimited "
        f"(proxygate's default) unless said; {TASKS}-task cases hold each lease across one "
        "asyncio.sleep(0)",
        rows,
    )
    if pharox is not None:
        say(
            f"  pharox path: {pharox['path']}; loop {pharox['loop']}; "
            f"pharox {pharox['pharox_version']}, fresh store per case, bounded by time"
        )


def report_scale(ours: dict[str, Any]) -> None:
    scale = ours["pool_scale"]
    rows = [
        (
            f"{size:,} upstreams",
            rate_text(summary["rate"]),
            f"{rounds_text(summary)}; build {scale['build_seconds'][size]:.2f} s + bulk add "
            f"{scale['add_seconds'][size]:.2f} s (not timed)",
        )
        for size, summary in scale["sizes"].items()
    ]
    print_table(
        f"2. pool size: 1 task, round robin, sizes interleaved round by round; "
        f"C = {scale['cost_ratio']:.2f} (on CPU time {scale['cpu_cost_ratio']:.2f})",
        rows,
    )


def report_selectors(ours: dict[str, Any]) -> None:
    selectors = ours["selectors"]
    small, large = selectors["sizes"]
    entries = {"round_robin": ours["pool_scale"], **selectors["selectors"]}
    rows = [
        (
            name,
            f"{rate_text(entry['sizes'][small]['rate'])} | "
            f"{rate_text(entry['sizes'][large]['rate'])}",
            f"cost ratio {entry['cost_ratio']:.2f} (on CPU time {entry['cpu_cost_ratio']:.2f})"
            + ("; from table 2" if name == "round_robin" else ""),
        )
        for name, entry in entries.items()
    ]
    print_table(
        f"3. selectors, 1 task, pairs/s at {small:,} | {large:,} upstreams (informative; median "
        f"of {selectors['rounds']} interleaved round(s) of "
        f"{next(iter(selectors['selectors'].values()))['sizes'][small]['pairs']:,} pairs)",
        rows,
    )


def report_drift(ours: dict[str, Any]) -> None:
    result = ours["drift"]
    rows = []
    for number, run in enumerate(result["runs"], start=1):
        tenths = ", ".join(f"{rate / 1000:.0f}k" for rate in run["chunk_rates"])
        rows.append(
            (
                f"run {number}",
                rate_text(run["overall_rate"]),
                f"first 10% {run['chunk_rates'][0]:,.0f}, last 10% {run['chunk_rates'][-1]:,.0f}"
                f" -> D {run['drift']:.2f} (CPU time {run['cpu_drift']:.2f}); per tenth "
                f"{tenths}; cpu share >= {min(run['cpu_shares']):.0%}; after: "
                f"{run['leases_held_after']} held, {run['gc_objects_growth']:+d} gc objects",
            )
        )
    print_table(
        f"4. drift: {len(result['runs'])} separate runs of {result['pairs']:,} sequential pairs, "
        f"pool of {HEADLINE_POOL_SIZE}, round robin; D = median of the runs' "
        f"(last 10% / first 10%) = {result['drift']:.2f} (on CPU time {result['cpu_drift']:.2f})",
        rows,
    )


def report_targets(summary: dict[str, Any]) -> None:
    def two_places(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    targets, cpu = summary["targets"], summary["cross_checks_on_cpu_time"]
    say("\ntargets (wall clock; CPU-time cross-check in brackets)")
    say(
        f"  R = proxygate / pharox, 1 task  {two_places(summary['R']):>8}           "
        f">= {TARGET_R:g}   {targets['R']['verdict']}"
    )
    say(
        f"  C = cost 100k / cost 100 pool   {two_places(summary['C']):>8}  [{cpu['C']:.2f}]  "
        f"<= {TARGET_C:g}   {targets['C']['verdict']}"
    )
    say(
        f"  D = rate last 10% / first 10%   {two_places(summary['D']):>8}  [{cpu['D']:.2f}]  "
        f">= {TARGET_D:g}   {targets['D']['verdict']}"
    )
    share = summary["cpu_share"]
    say(
        f"  CPU share of the timed proxygate runs: lowest {share['lowest']:.0%}, "
        f"median {share['median']:.0%}"
    )
    if summary["machine_busy"]:
        say(
            f"  WARNING: other processes took the CPU during this run (a timed run got under "
            f"{BUSY_CPU_SHARE:.0%} of a core): the wall-clock figures carry their noise; rerun "
            "on a quiet machine before trusting a MISS"
        )


def write_figures(
    path: Path, args: argparse.Namespace, loop_name: str, plan: Any, figures: dict[str, Any]
) -> None:
    """Every figure of a run as JSON at `path`, after what the run was."""
    document = {
        "mode": "quick" if args.quick else "full",
        "python": platform.python_version(),
        "loop": loop_name,
        "plan": asdict(plan),
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    say(f"figures written to {path}")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Acquire+release throughput of proxygate's leasing core beside pharox 0.11."
    )
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure here")
    parser.add_argument(
        "--storage",
        action="append",
        default=[],
        metavar="URL",
        help="instead of the memory benchmark, acquire+release on this SQL storage "
        "(postgresql://host:port/db, or sqlite:/// for a temporary file); repeatable or a "
        "comma list; each case on a schema or file of its own, dropped afterwards",
    )
    parser.add_argument(
        "--no-peer", action="store_true", help="with --storage: leave pharox out (no bench venv)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        metavar="S",
        help="with --storage: length of each timed case (default 5, 1 with --quick)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.storage:
        from loadtest import _bench_sql  # the SQL section only: no memory figures are taken

        return _bench_sql.main(args)
    plan = QUICK if args.quick else FULL
    factory, loop_name = loop_factory()
    started = time.perf_counter()
    say(
        f"bench_core ({'quick' if args.quick else 'full'} run): python "
        f"{platform.python_version()}, event loop {loop_name}, MemoryStorage, "
        "no callbacks, sweeper not started"
    )

    pharox_python, venv_note = ensure_bench_venv()
    say(
        f"[pharox] bench venv: {venv_note}"
        if pharox_python
        else f"[pharox] NOT MEASURED: {venv_note}"
    )

    with asyncio.Runner(loop_factory=factory) as runner:
        ours = runner.run(measure_proxygate(plan))

    pharox: dict[str, Any] | None = None
    why_not = venv_note
    if pharox_python is not None:
        pharox, why_not = measure_pharox(pharox_python, plan)
        if pharox is None:
            say(f"[pharox] NOT MEASURED: {why_not}")

    summary = summarize(ours, pharox)
    report_headline(ours, pharox, why_not)
    report_scale(ours)
    report_selectors(ours)
    report_drift(ours)
    report_targets(summary)
    elapsed = time.perf_counter() - started
    say(f"\nrun took {elapsed:.1f} s; proxygate figures are medians of their rounds")

    if args.json is not None:
        figures = {
            "proxygate": ours,
            "pharox": pharox if pharox is not None else {"measured": False, "reason": why_not},
            "summary": summary,
            "summary_line": summary_line(summary),
            "elapsed_seconds": elapsed,
        }
        write_figures(args.json, args, loop_name, plan, figures)
    say(summary_line(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
