"""`python -m loadtest crash-hunt`: the gateway under faults, aborts and database outages, until
it crashes or the time is up. See loadtest/README.md ("Crash hunt").

For each storage x workers combination, runs of `proxygate run --workers N` (PYTHONFAULTHANDLER
on) take a fault-ridden load (`_crash_clients`, `_crash_rig`, `_crash_storage`); each run is
judged by what the gateway's processes did, never by the answers clients got:

- no gateway process died of a signal (the parent's status, "worker N exited with -S", "Fatal
  Python error");
- once the load stops and things settle, no lease is held (admin `/api/stats`: `leased` and
  `leases_held` 0 in every pool; on SQL, no row in `leases`);
- open fds of every gateway process and asyncio tasks of worker 0 are back to the baseline taken
  after the warm-up (tolerances: `FD_SLACK`, `TASK_SLACK`; database connections counted apart,
  bounded by the engine's pool);
- no "Traceback", "Exception in callback", "Task exception was never retrieved" in its output;
- SIGTERM, then exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import procs
from loadtest._crash_clients import Gates, Tally, run_clients
from loadtest._crash_gateway import (
    GATEWAY_TIMEOUTS,
    GatewayProcess,
    gateway_config,
    log_problems,
    open_fds,
    run_command,
    signal_deaths,
)
from loadtest._crash_report import report_lines
from loadtest._crash_rig import Rig, debian_missing, running_rig
from loadtest._crash_storage import Place, PostgresServer, make_place

__all__ = ["COMBINATIONS", "HuntOptions", "RunResult", "hunt", "main"]

STORAGES = ("memory", "sqlite", "postgresql")
#: memory:// refuses --workers > 1 (each worker would have pools of its own).
COMBINATIONS = (("memory", 1), ("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2))
#: Open fds a gateway process may hold above its baseline once quiet: the admin connection of
#: the hunt's own last reading (closed by the gateway just after it answered) and one upstream
#: connection whose idle timer (`keepalive_idle_timeout`, 1 s) is just due. A leak per fault or
#: per abort would be hundreds over a run.
FD_SLACK = 2
#: Database connections a process may hold: the engine's pool (PostgreSQL: 8 + 8 lanes + 16
#: overflow). They come and go with the load and the restarts, so they are not held to the
#: baseline, only to this bound.
DB_FD_BOUND = 32
#: asyncio tasks worker 0 may run above its baseline once quiet: a lease sweep and a heartbeat
#: that happen to be in flight when it is read (both run every second on SQL storage). A task
#: that never finishes, left per fault, would be dozens.
TASK_SLACK = 2
#: Seconds the settle may take at most: leases given back during an outage are written by a
#: sweep once the database is back, and kept upstream connections expire after 1 s.
SETTLE_MEMORY, SETTLE_SQL = 8.0, 25.0
#: Shortest run worth starting with what is left of a combination's time.
MIN_RUN = 4.0


@dataclass
class HuntOptions:
    seconds: float  # load per combination
    combinations: list[tuple[str, int]]
    gateway_python: str = sys.executable
    seed: int = 0
    run_length: float = 60.0
    clients: int = 12
    warmup: float = 2.0
    postgres: str = "auto"  # private, shared or auto
    debian: bool = True
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    say: Callable[[str], None] = print


@dataclass
class RunResult:
    storage: str
    workers: int
    index: int
    seconds: float = 0.0
    #: Seconds of load the gateway took (until it died, if it did).
    load_seconds: float = 0.0
    tally: Tally = field(default_factory=Tally)
    faults: Counter[str] = field(default_factory=Counter)
    db_restarts: int = 0
    db_outages: int = 0
    crashes: list[str] = field(default_factory=list)
    leaked: int = 0
    lease_rows: int | None = None
    fd_deltas: dict[str, int] = field(default_factory=dict)
    db_fds: dict[str, int] = field(default_factory=dict)
    task_delta: int | None = None
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)
    log: Path | None = None

    @property
    def combination(self) -> str:
        return f"{self.storage} x{self.workers}"


@dataclass
class _Baseline:
    fds: dict[str, int]
    tasks: int | None


async def hunt(options: HuntOptions) -> list[RunResult]:
    """Every combination in turn, on one rig; the runs' results."""
    rng = random.Random(options.seed)
    results: list[RunResult] = []
    pg: PostgresServer | None = None
    async with running_rig(options.workdir, rng, debian=options.debian) as rig:
        try:
            for storage, workers in options.combinations:
                if storage == "postgresql" and pg is None:
                    pg, how = await PostgresServer.open(options.postgres)
                    if pg is None:
                        raise HuntError(how)
                    options.say(f"  PostgreSQL: {how}")
                results += await hunt_combination(rig, pg, storage, workers, options, rng)
        finally:
            if pg is not None:
                await pg.close()
    return results


class HuntError(RuntimeError):
    """The hunt could not run at all (no PostgreSQL, a rig part that did not start)."""


async def hunt_combination(
    rig: Rig,
    pg: PostgresServer | None,
    storage: str,
    workers: int,
    options: HuntOptions,
    rng: random.Random,
) -> list[RunResult]:
    """Runs of one combination until its `options.seconds` of load are spent."""
    results: list[RunResult] = []
    spent = 0.0
    while options.seconds - spent >= MIN_RUN or not results:
        seconds = min(options.run_length, max(options.seconds - spent, MIN_RUN))
        result = RunResult(storage, workers, len(results) + 1)
        results.append(result)
        started = time.monotonic()
        await _one_run(rig, pg, result, seconds, options, random.Random(rng.getrandbits(32)))
        result.seconds = time.monotonic() - started
        spent += min(seconds, result.seconds)
        if not result.load_seconds:
            break  # it never took load (no start, no database): another try would do the same
        options.say(f"  {_run_line(result)}")
    return results


def _run_line(result: RunResult) -> str:
    verdict = "ok"
    if result.crashes:
        verdict = f"CRASHED after {result.load_seconds:.1f} s of load"
    elif result.problems:
        verdict = "FAILED"
    return (
        f"{result.combination} run {result.index}: {verdict} in {result.seconds:.0f} s, "
        f"{result.tally.requests:,} requests, {result.tally.tunnels:,} tunnels, "
        f"{sum(result.faults.values()):,} faults, {sum(result.tally.aborts.values()):,} aborts"
    )


async def _one_run(
    rig: Rig,
    pg: PostgresServer | None,
    result: RunResult,
    seconds: float,
    options: HuntOptions,
    rng: random.Random,
) -> None:
    label = f"crash_hunt_{os.getpid()}_{result.storage}{result.workers}_{result.index}"
    directory = options.workdir / label
    directory.mkdir(parents=True, exist_ok=True)
    place = await make_place(result.storage, label, directory, pg)
    try:
        if result.storage != "memory":
            code, output = await run_command(
                options.gateway_python,
                ["db", "upgrade", "--storage", place.url],
                directory,
                directory / "upgrade.log",
            )
            if code != 0:
                result.problems.append(f"proxygate db upgrade exited {code}: {output[-400:]}")
                return
        ports = (procs.free_port(), procs.free_port(), procs.free_port())
        admin_port = procs.free_port()
        config = directory / "gateway.toml"
        config.write_text(gateway_config(ports, admin_port, place.url, rig.upstreams()))
        gateway = GatewayProcess(
            options.gateway_python, config, result.workers, directory / "gateway.log",
            admin_port, ports,
        )  # fmt: skip
        result.log = gateway.log
        await _with_gateway(rig, place, gateway, result, seconds, options, rng, directory)
    finally:
        result.db_restarts, result.db_outages = place.restarts, place.outages
        await place.drop()


async def _with_gateway(
    rig: Rig,
    place: Place,
    gateway: GatewayProcess,
    result: RunResult,
    seconds: float,
    options: HuntOptions,
    rng: random.Random,
    directory: Path,
) -> None:
    why = await gateway.start(directory)
    try:
        if why is not None:
            result.problems.append(f"the gateway did not start: {why}")
            return
        rig.new_counts()
        gates = Gates(
            ("127.0.0.1", gateway.ports[0]),
            ("127.0.0.1", gateway.ports[1]),
            ("127.0.0.1", gateway.ports[2]),
            rig.origin_address,
        )
        warmup = min(options.warmup, seconds / 4)
        load = _Load(rig, place, gateway, gates, result, options)
        alive = await load.run(warmup, rng, disturb=False)
        baseline = await _baseline(gateway, place) if alive else None
        if alive:
            alive = await load.run(seconds - warmup, rng, disturb=True)
        _collect(rig, result)
        if alive and baseline is not None:
            await _settle(gateway, place, result, baseline)
    finally:
        result.exit_code = await gateway.stop(GATEWAY_TIMEOUTS["drain_timeout"] + 20.0)
        _judge_exit(gateway, result)


@dataclass
class _Load:
    rig: Rig
    place: Place
    gateway: GatewayProcess
    gates: Gates
    result: RunResult
    options: HuntOptions

    async def run(self, seconds: float, rng: random.Random, *, disturb: bool) -> bool:
        """Clients, phases and (if `disturb`) database outages for `seconds`, stopped early if
        the gateway dies; whether it still runs."""
        seeds = [random.Random(rng.getrandbits(32)) for _ in range(3)]
        parts = [
            asyncio.create_task(
                run_clients(
                    self.gates,
                    self.result.tally,
                    seeds[0],
                    clients=self.options.clients,
                    seconds=seconds,
                )
            ),
            asyncio.create_task(self.rig.run_phases(seconds, seeds[1])),
        ]
        if disturb:
            parts.append(asyncio.create_task(self.place.disturb(seconds, seeds[2])))
        watch = asyncio.create_task(_until_dead(self.gateway, seconds + 60.0))
        started = time.monotonic()
        try:
            pending: set[asyncio.Task[None]] = {*parts, watch}
            while not watch.done() and not all(part.done() for part in parts):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for part in parts:
                    if part.done() and not part.cancelled() and part.exception() is not None:
                        raise HuntError(f"the hunt failed: {part.exception()!r}")
        finally:
            for task in (*parts, watch):
                task.cancel()
            await asyncio.gather(*parts, watch, return_exceptions=True)
            self.result.load_seconds += time.monotonic() - started
            await self.rig.clear_phases()
            await self.place.ensure_up()
        return self.gateway.running()


async def _until_dead(gateway: GatewayProcess, bound: float) -> None:
    deadline = time.monotonic() + bound
    while gateway.running() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)


@dataclass
class _Reading:
    leased: int  # leases held, over every pool, as the admin API counts them (-1: no answer)
    pools: str  # per pool with leases held: its `leased` and `leases_held`
    fds: dict[str, tuple[int, int]]  # process name: (fds but database, database connections)
    tasks: int | None


async def _read(gateway: GatewayProcess, place: Place) -> _Reading:
    stats = await gateway.stats()
    leased, tasks, held = -1, None, ""
    if stats is not None:
        pools = stats.get("pools", {})
        assert isinstance(pools, dict)
        leased = sum(max(p["leased"], p["leases_held"]) for p in pools.values())
        held = ", ".join(
            f"{name}: leased {p['leased']}, leases held {p['leases_held']}"
            for name, p in pools.items()
            if p["leased"] or p["leases_held"]
        )
        raw = stats.get("tasks")
        tasks = raw if isinstance(raw, int) else None
    fds = {name: open_fds(pid, place.db_port) for name, pid in gateway.processes().items()}
    return _Reading(leased, held, fds, tasks)


async def _quiet(gateway: GatewayProcess, place: Place, bound: float) -> _Reading:
    """Wait (at most `bound` s) until no lease is held and kept connections have expired."""
    deadline = time.monotonic() + bound
    reading = await _read(gateway, place)
    while reading.leased != 0 and time.monotonic() < deadline and gateway.running():
        await asyncio.sleep(0.25)
        reading = await _read(gateway, place)
    # Kept upstream connections close after keepalive_idle_timeout; tunnels are all gone.
    await asyncio.sleep(GATEWAY_TIMEOUTS["keepalive_idle_timeout"] + 0.5)
    return await _read(gateway, place)


async def _baseline(gateway: GatewayProcess, place: Place) -> _Baseline:
    bound = SETTLE_MEMORY if place.url == "memory://" else SETTLE_SQL
    reading = await _quiet(gateway, place, bound)
    return _Baseline({name: fds[0] for name, fds in reading.fds.items()}, reading.tasks)


def _fits(reading: _Reading, baseline: _Baseline) -> bool:
    fds_back = all(
        reading.fds.get(name, (0, 0))[0] <= fds + FD_SLACK for name, fds in baseline.fds.items()
    )
    tasks_back = (
        baseline.tasks is None
        or reading.tasks is None
        or reading.tasks <= baseline.tasks + TASK_SLACK
    )
    return reading.leased == 0 and fds_back and tasks_back


async def _settle(
    gateway: GatewayProcess, place: Place, result: RunResult, baseline: _Baseline
) -> None:
    """After the load: leases back, fds and tasks back to the baseline (or the figures why not)."""
    bound = SETTLE_MEMORY if place.url == "memory://" else SETTLE_SQL
    deadline = time.monotonic() + bound
    reading = await _quiet(gateway, place, bound)
    while not _fits(reading, baseline) and time.monotonic() < deadline and gateway.running():
        await asyncio.sleep(0.5)
        reading = await _read(gateway, place)
    if reading.leased < 0:
        result.problems.append("the admin API did not answer /api/stats after the load")
    result.leaked = max(reading.leased, 0)
    if result.leaked:
        result.problems.append(
            f"LEAK: {result.leaked} lease(s) still held after {bound:g} s ({reading.pools})"
        )
    try:
        result.lease_rows = await place.lease_rows()
    except Exception as exc:
        result.problems.append(f"could not count the leases table: {exc!r}")
    if result.lease_rows:
        rows = "; ".join(await place.some_leases())
        result.problems.append(
            f"LEAK: {result.lease_rows} row(s) left in the leases table, the first: {rows}"
        )
    for name, fds in baseline.fds.items():
        now, to_db = reading.fds.get(name, (fds, 0))
        result.fd_deltas[name] = now - fds
        result.db_fds[name] = to_db
        if now - fds > FD_SLACK:
            result.problems.append(f"{name}: {now - fds:+d} open fds over the baseline ({fds})")
        if to_db > DB_FD_BOUND:
            result.problems.append(f"{name}: {to_db} database connections (bound {DB_FD_BOUND})")
    if baseline.tasks is not None and reading.tasks is not None:
        result.task_delta = reading.tasks - baseline.tasks
        if result.task_delta > TASK_SLACK:
            result.problems.append(
                f"{result.task_delta:+d} asyncio tasks over the baseline ({baseline.tasks})"
            )


def _collect(rig: Rig, result: RunResult) -> None:
    result.faults.update(rig.counts)
    del result.faults["relayed"]
    result.faults.update({f"phase_{kind}": n for kind, n in rig.phases.items()})
    result.faults["dial_blackhole"] += rig.stalled["blackhole"]


def _judge_exit(gateway: GatewayProcess, result: RunResult) -> None:
    text = gateway.text()
    result.crashes += signal_deaths(text, result.exit_code)
    for problem in log_problems(text):
        result.problems.append(f"in the gateway's output: {problem}")
    if result.exit_code != 0:
        how = "had to be killed" if result.exit_code is None else f"exited {result.exit_code}"
        result.problems.append(f"the gateway {how} on SIGTERM")


# -- the command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest crash-hunt",
        description="Hunt for gateway crashes under upstream faults, client aborts and database "
        "outages, on loopback, bounded in time. Exit status 1 on any crash, leak or error.",
    )
    parser.add_argument(
        "--duration", type=float, default=120.0,
        help="seconds of load in all, shared evenly by the combinations (default 120)",
    )  # fmt: skip
    parser.add_argument("--storages", default="memory,sqlite,postgresql")
    parser.add_argument("--workers", default="1,2", help="worker counts (memory: 1 only)")
    parser.add_argument(
        "--gateway-python", default=sys.executable,
        help="the Python whose installed proxygate runs (default: this one)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help="the random choices' seed (default: random)")
    parser.add_argument(
        "--run-length", type=float, default=60.0, help="longest run of one gateway process"
    )
    parser.add_argument("--clients", type=int, default=12, help="concurrent client loops")
    parser.add_argument(
        "--postgres", choices=("auto", "private", "shared"), default="auto",
        help="a private server restarted mid-run, or the shared one at 127.0.0.1:5432",
    )  # fmt: skip
    parser.add_argument(
        "--no-debian", action="store_true", help="leave out tinyproxy and microsocks"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return parser


def combinations(storages: Sequence[str], workers: Sequence[int]) -> list[tuple[str, int]]:
    return [(s, w) for s, w in COMBINATIONS if s in storages and w in workers]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        print("crash-hunt: --workers takes a comma list of counts", file=sys.stderr)
        return 2
    unknown = sorted(set(storages) - set(STORAGES))
    chosen = combinations(storages, workers)
    if unknown or not chosen or args.duration <= 0 or args.clients < 1:
        print(
            f"crash-hunt: nothing to run (storages from {', '.join(STORAGES)}; memory takes 1 "
            "worker; --duration > 0; --clients >= 1)",
            file=sys.stderr,
        )
        return 2
    missing = debian_missing()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    workdir = Path(tempfile.mkdtemp(prefix="crash-hunt-"))
    options = HuntOptions(
        seconds=max(args.duration / len(chosen), MIN_RUN),
        combinations=chosen,
        gateway_python=args.gateway_python,
        seed=seed,
        run_length=args.run_length,
        clients=args.clients,
        postgres=args.postgres,
        debian=not args.no_debian and not missing,
        workdir=workdir,
        say=lambda line: print(line, flush=True),
    )
    print(
        f"crash-hunt: {', '.join(f'{s} x{w}' for s, w in chosen)}; {options.seconds:.0f} s of "
        f"load each, runs of at most {args.run_length:g} s; seed {seed}; gateway "
        f"{args.gateway_python}",
        flush=True,
    )
    if missing and not args.no_debian:
        print(f"  NOT USED: {', '.join(missing)} (not installed)", flush=True)
    procs.raise_fd_limit()
    failed = True
    try:
        results = _run(options)
        lines, failed = report_lines(results)
        for line in lines:
            print(line)
    except HuntError as exc:
        print(f"crash-hunt: {exc}", file=sys.stderr)
    finally:
        if args.keep or failed:
            print(f"work directory kept (gateway logs): {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def _run(options: HuntOptions) -> list[RunResult]:
    import uvloop

    return uvloop.run(hunt(options))
