"""The idle-tunnels scenario: what N open, idle CONNECT tunnels cost the gateway in memory.

One run: the origin in a rig process of its own and the fleet spread over as many rig processes
as their open-file limits need, proxygate with an idle timeout that outlasts the run, then

1. after `--warmup` seconds, the gateway's RSS, fds, threads and asyncio tasks ("before");
2. N tunnels opened, `-c` at a time: CONNECT, 200, then one GET through the tunnel and its whole
   response (the tunnel works end to end); each bounded by `--timeout`, all of them by
   OPEN_BUDGET_BASE + N / OPEN_RATE_FLOOR seconds;
3. held idle for `--duration` seconds, then the same readings ("open") and the leases held
   from `/api/stats` (one per tunnel);
4. every tunnel closed, the zero-leak check (`--drain-wait`, plus a second per thousand
   tunnels), the readings once more ("closed"), and the gateway stopped.

The figure is (RSS open - RSS before) / tunnels open, in KiB. A tunnel is one connection in the
harness, two in the gateway, two at its fleet upstream and one at the origin. Each process's
open-file limit is raised to the hard limit and checked against what it is going to hold
before any tunnel opens: a hard limit too low fails the run, naming the largest N that fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest import procs
from loadtest.client import ClientError, Conn, Counters, Plan, classify, open_conn
from loadtest.procstat import fd_limit
from loadtest.rig import Rig
from loadtest.runner import (
    Options,
    TargetRun,
    drain_check,
    gateway_config,
    plan_for,
    rest_cpus,
    sampler,
    start_target,
)
from loadtest.targets import GatewayConfig, GatewayRefused, Running, TargetError

__all__ = ["FleetLayout", "fleet_layout", "report_lines", "run_idle", "summary_line"]

OPEN_BUDGET_BASE = 30.0
#: Tunnels a second below which the open phase is cut short (the gateway is then broken).
OPEN_RATE_FLOOR = 50.0
#: Files a harness or rig process holds besides its tunnels: listeners, pipes, logs.
FD_MARGIN = 64
#: Files the gateway may open besides what it holds before and the tunnels: admin requests,
#: health checks.
GATEWAY_FD_MARGIN = 16
#: Round robin spreads tunnels evenly over the fleet; room for this much more per upstream.
SPREAD = 1.25
#: Upstreams have addresses 127.0.0.10 and up.
MAX_UPSTREAMS = 240
PROGRESS_EVERY = 2.0
KIB = 1024


@dataclasses.dataclass(frozen=True)
class FleetLayout:
    """How many upstreams, and how many of them each fleet process runs."""

    upstreams: int
    shards: tuple[int, ...]


def fleet_layout(tunnels: int, upstreams: int, limit: int) -> FleetLayout:
    """Upstreams (at least `upstreams`) and fleet processes enough that no process needs more
    than `limit` open files: each tunnel is two connections at its upstream."""
    room = max(2, limit - FD_MARGIN)

    def files(count: int) -> int:
        return 2 * math.ceil(tunnels * SPREAD / count)

    while files(upstreams) > room and upstreams < MAX_UPSTREAMS:
        upstreams += 1
    per_process = max(1, room // files(upstreams))
    shards = tuple(min(per_process, upstreams - i) for i in range(0, upstreams, per_process))
    return FleetLayout(upstreams, shards)


def _too_few_files(tunnels: int, where: str, need: int, limit: int, fits: int) -> str:
    return (
        f"{tunnels:,} tunnels need {need:,} open files in {where}, which may have {limit:,} "
        f"(the hard limit here: raise it as root, e.g. `ulimit -Hn`); at most "
        f"{max(fits, 0):,} tunnels fit"
    )


def _reading(running: Running) -> dict[str, int | None]:
    found = running.sample()
    if found is None:
        return {}
    return {
        "rss_bytes": found.rss,
        "fds": found.fds,
        "threads": found.threads,
        "tasks": running.tasks(),
    }


async def _leases_held(running: Running) -> int | None:
    try:
        stats = await running.stats() or {"pools": {}}
        return sum(int(p["leases_held"]) for p in stats["pools"].values())
    except (OSError, TargetError, TimeoutError, KeyError, ValueError):
        return None


async def open_tunnels(
    plan: Plan,
    count: int,
    *,
    at_once: int,
    timeout: float,
    budget: float,
    into: list[Conn],
    log: Callable[[str], None],
) -> Counter[str]:
    """Open up to `count` tunnels, `at_once` at a time, within `budget` seconds, each proven by
    one request; the open ones go `into`, failures are counted by kind (and not retried)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    counters = Counters()
    errors: Counter[str] = Counter()
    request = plan.request(None)
    issued = 0

    async def opener() -> None:
        nonlocal issued
        while issued < count and loop.time() < deadline:
            issued += 1
            conn: Conn | None = None
            try:
                async with asyncio.timeout(timeout):
                    conn = await open_conn(plan, counters, None)
                    response = await conn.request(request)
                if response.status != 200:
                    raise ClientError(f"http_{response.status}")
            except (OSError, ClientError, TimeoutError) as exc:
                errors[classify(exc)] += 1
                if conn is not None:
                    conn.abort()
                continue
            except BaseException:
                if conn is not None:
                    conn.abort()
                raise
            into.append(conn)

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            log(f"{len(into):,}/{count:,} tunnels open, {sum(errors.values()):,} failed")

    openers = [loop.create_task(opener(), name=f"idle-opener-{i}") for i in range(at_once)]
    ticker = loop.create_task(progress(), name="idle-progress")
    try:
        _, late = await asyncio.wait(openers, timeout=budget + timeout + 1.0)
        for task in late:
            task.cancel()
        await asyncio.gather(*openers, return_exceptions=True)
        for task in openers:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    if issued < count:
        errors["not_attempted"] += count - issued
    return errors


async def run_idle(options: Options, log: Callable[[str], None]) -> list[TargetRun]:
    """The scenario's one run (see the module docstring); the rig is stopped before returning."""
    run = TargetRun("proxygate", "", 1, options.scenario.unit)
    count = options.tunnels
    limit = procs.raise_fd_limit()
    # The harness holds one end of every tunnel, and so does the origin's process.
    if count + FD_MARGIN > limit:
        where = "the harness and in the origin's process"
        run.failed = _too_few_files(count, where, count + FD_MARGIN, limit, limit - FD_MARGIN)
        return [run]
    layout = fleet_layout(count, options.upstreams, limit)
    cpus = sorted(rest_cpus()) if options.pin else []
    rigs: list[Rig] = []
    try:
        common: dict[str, Any] = {"sizes": [options.body], "fleet": "sim", "cpus": cpus}
        spec = {**common, "origin": options.origin, "kinds": []}
        rigs.append(await Rig.start(spec, _rig_dir(options, "origin")))
        first = 0
        for index, size in enumerate(layout.shards):
            spec = {**common, "origin": "none", "kinds": ["http"] * size, "first": first}
            rigs.append(await Rig.start(spec, _rig_dir(options, f"fleet-{index}")))
            first += size
        urls = tuple(u.url for rig in rigs[1:] for u in rig.upstreams)
        budget = OPEN_BUDGET_BASE + count / OPEN_RATE_FLOOR
        drain = options.drain_wait + count / 1000.0
        # The gateway must not end a tunnel for idling before the harness does.
        outlast = options.warmup + budget + options.timeout + options.duration + drain + 600.0
        config = dataclasses.replace(
            gateway_config(options, urls, "memory://"), idle_timeout=math.ceil(outlast)
        )
        run.idle = {
            "tunnels_asked": count,
            "open_concurrency": options.connections,
            "hold_seconds": options.duration,
            "open_budget_seconds": budget,
            "upstreams": layout.upstreams,
            "fleet_processes": len(layout.shards),
            "harness_fd_limit": limit,
            "gateway_idle_timeout": config.idle_timeout,
        }
        await _measure(run, options, rigs[0], config, budget, drain, log)
    finally:
        for rig in reversed(rigs):
            await rig.stop()
    return [run]


def _rig_dir(options: Options, name: str) -> Path:
    directory = options.workdir / f"rig-{name}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def _measure(
    run: TargetRun,
    options: Options,
    origin: Rig,
    config: GatewayConfig,
    budget: float,
    drain: float,
    log: Callable[[str], None],
) -> None:
    try:
        running = await start_target(
            "proxygate", options, origin, config, options.workdir / "proxygate"
        )
    except GatewayRefused as exc:
        run.refused = str(exc)
        return
    except TargetError as exc:
        run.failed = str(exc)
        return
    if options.pin and running.pid is not None:
        running.pin({0})
    watch = asyncio.create_task(sampler(running, run.samples), name="idle-sampler")
    conns: list[Conn] = []
    try:
        await _open_and_hold(run, options, origin, running, budget, conns, log)
    finally:
        for conn in conns:
            conn.close()
        if conns:
            log(f"closed {len(conns):,} tunnels")
        try:
            run.leases = await drain_check(running, drain)
        except (OSError, TargetError, TimeoutError, KeyError) as exc:
            run.notes.append(f"could not read /api/stats after closing: {exc}")
        if run.idle is not None and "before" in run.idle:
            run.idle["closed"] = await _settled(running, run.idle["before"])
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        run.exit_code = await running.stop()


async def _settled(running: Running, before: dict[str, int | None]) -> dict[str, int | None]:
    """The readings once the gateway has closed what it held: leases go back a moment before
    the client's connection is closed, and tasks are counted only twice a second. Up to 3 s
    for fds and tasks to come back down to where they were."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0

    def above(reading: dict[str, int | None]) -> bool:
        return any(
            (then := before.get(key)) is not None and (reading.get(key) or 0) > then
            for key in ("fds", "tasks")
        )

    reading = _reading(running)
    while above(reading) and loop.time() < deadline:
        await asyncio.sleep(0.1)
        reading = _reading(running)
    return reading


async def _open_and_hold(
    run: TargetRun,
    options: Options,
    origin: Rig,
    running: Running,
    budget: float,
    conns: list[Conn],
    log: Callable[[str], None],
) -> None:
    figures = run.idle
    assert figures is not None
    assert running.pid is not None
    count = options.tunnels
    await asyncio.sleep(options.warmup)
    before = figures["before"] = _reading(running)
    limit = figures["gateway_fd_limit"] = fd_limit(running.pid)
    held_before = (before.get("fds") or 0) + GATEWAY_FD_MARGIN
    if limit is not None and held_before + 2 * count > limit:
        need, fits = held_before + 2 * count, (limit - held_before) // 2
        run.failed = _too_few_files(count, "proxygate", need, limit, fits)
        return
    plan = plan_for(options, origin, running.listen).with_tls_context()
    loop = asyncio.get_running_loop()
    started = loop.time()
    errors = await open_tunnels(
        plan,
        count,
        at_once=options.connections,
        timeout=options.timeout,
        budget=budget,
        into=conns,
        log=log,
    )
    figures["open_seconds"] = round(loop.time() - started, 3)
    figures["tunnels_open"] = len(conns)
    figures["errors"] = dict(errors)
    log(f"{len(conns):,} tunnels open; held idle for {options.duration:g} s")
    await asyncio.sleep(options.duration)
    after = figures["open"] = _reading(running)
    figures["leases_held_open"] = held = await _leases_held(running)
    figures["closed_while_idle"] = lost = sum(1 for conn in conns if conn.closed)
    alive = len(conns) - lost
    figures.update(_per_tunnel(before, after, alive))
    if len(conns) < count:
        run.problems.append(f"only {len(conns):,} of {count:,} tunnels opened: {dict(errors)}")
    if lost:
        run.problems.append(f"{lost:,} tunnels were closed while idle")
    if held != alive:
        run.problems.append(f"{held} leases held while {alive:,} tunnels were open")


def _per_tunnel(
    before: dict[str, int | None], after: dict[str, int | None], tunnels: int
) -> dict[str, float | None]:
    def per(key: str, scale: float = 1.0) -> float | None:
        first, last = before.get(key), after.get(key)
        if first is None or last is None or tunnels == 0:
            return None
        return round((last - first) / tunnels / scale, 3)

    return {
        "rss_per_tunnel_kib": per("rss_bytes", KIB),
        "fds_per_tunnel": per("fds"),
        "tasks_per_tunnel": per("tasks"),
    }


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _state(reading: dict[str, int | None]) -> str:
    return (
        f"RSS {_mib(reading.get('rss_bytes'))}, fds {_count(reading.get('fds'))}, "
        f"threads {_count(reading.get('threads'))}, tasks {_count(reading.get('tasks'))}"
    )


def report_lines(run: TargetRun) -> list[str]:
    """The run in words, for the report (the table of the load scenarios does not apply)."""
    figures = run.idle or {}
    if run.refused:
        return [f"proxygate REFUSED: {run.refused}"]
    lines = []  # a failure is reported with the exit status
    if "tunnels_open" in figures:
        errors = figures.get("errors") or {}
        failed = ", ".join(f"{k} {n:,}" for k, n in errors.items()) or "none failed"
        lines.append(
            f"tunnels: {figures['tunnels_open']:,} of {figures['tunnels_asked']:,} opened in "
            f"{figures['open_seconds']:.1f} s, {figures['open_concurrency']} at a time "
            f"({failed}); held idle {figures['hold_seconds']:g} s, "
            f"{figures['closed_while_idle']:,} closed meanwhile"
        )
    if "before" in figures:
        lines.append(f"proxygate before the tunnels: {_state(figures['before'])}")
    if "open" in figures:
        lines.append(
            f"proxygate with them open:     {_state(figures['open'])}; leases held "
            f"{_count(figures['leases_held_open'])}"
        )
        rss, fds, tasks = (
            figures.get(k) for k in ("rss_per_tunnel_kib", "fds_per_tunnel", "tasks_per_tunnel")
        )
        lines.append(
            "  per tunnel: "
            + (f"{rss:.2f} KiB RSS" if rss is not None else "n/a KiB RSS")
            + (f", {fds:.2f} fds" if fds is not None else "")
            + (f", {tasks:.2f} tasks" if tasks is not None else "")
        )
    if "closed" in figures:
        lines.append(f"proxygate once they closed:   {_state(figures['closed'])}")
    return lines


def summary_line(runs: list[TargetRun]) -> str:
    """`idle-tunnels: proxygate X KiB/tunnel (N tunnels), fds A -> B, leases held N, leases
    leaked 0`, with n/a for what was not measured."""
    run = next((r for r in runs if r.target == "proxygate"), None)
    figures = (run.idle if run is not None else None) or {}
    rss = figures.get("rss_per_tunnel_kib")
    before, after = figures.get("before") or {}, figures.get("open") or {}
    held = figures.get("leases_held_open")
    open_ = figures.get("tunnels_open", 0) - figures.get("closed_while_idle", 0)

    def plain(value: Any) -> str:
        return "n/a" if value is None else str(value)

    return (
        f"idle-tunnels: proxygate {'n/a' if rss is None else f'{rss:.2f}'} KiB/tunnel "
        f"({open_} tunnels), fds {plain(before.get('fds'))} -> {plain(after.get('fds'))}, "
        f"leases held {plain(held)}, leases leaked {run.leaked if run is not None else 'n/a'}"
    )
