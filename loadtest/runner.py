"""One harness run: the rig up, each target started, loaded, checked and stopped in turn.

For every target run the record holds the load's figures (requests, bytes, latency
percentiles, errors by kind), the target's CPU over the measured window and its memory, and for
proxygate the leases read from `/api/stats` after the load stopped: acquired, released, and
still held once the drain wait is over (leaked). Compare mode alternates the targets round by
round on the same rig.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.builds import Build, is_proxygate
from loadtest.client import Plan
from loadtest.hdr import Histogram
from loadtest.loadgen import LoadResult, LoadSpec, Progress, run_load
from loadtest.procstat import ProcSample, set_affinity
from loadtest.rig import Rig
from loadtest.scenarios import Scenario
from loadtest.scratch_storage import scratch_storage
from loadtest.targets import (
    GatewayConfig,
    GatewayRefused,
    Running,
    TargetError,
    start_direct,
    start_peer,
    start_proxygate,
)
from loadtest.toxics import FaultStep, Toxics
from loadtest.wrk import run_wrk

__all__ = [
    "Options",
    "TargetRun",
    "drain_check",
    "rest_cpus",
    "run_scenario",
    "sampler",
    "start_target",
]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass
class Options:
    scenario: Scenario
    duration: float
    warmup: float
    connections: int
    rate: float | None
    requests: int | None
    upstreams: int
    body: int
    keepalive: bool
    tls: bool
    origin: str
    fleet: str
    timeout: float
    sessions: int
    compare: list[str]
    rounds: int
    storages: list[str]
    pool_sizes: list[int]
    faults: list[FaultStep]
    pin: bool
    drain_wait: float
    workdir: Path
    #: GatewayConfig fields set from the command line, over the scenario's.
    gateway: dict[str, float | int | str] = field(default_factory=dict)
    progress: Callable[[str, Progress], None] | None = None
    #: idle-tunnels: how many to hold.
    tunnels: int = 0
    #: "builtin" (`loadtest.loadgen`) or "wrk" (`loadtest.wrk`).
    loadgen: str = "builtin"
    #: Other builds of proxygate in `compare`, by their target name ("proxygate@1fea677").
    builds: dict[str, Build] = field(default_factory=dict)


@dataclass
class TargetRun:
    target: str
    label: str  # what varies between runs of one target: "", a storage URL, "pool 1000"
    round: int
    unit: str
    load: LoadResult | None = None
    cpu: float | None = None
    start_sample: ProcSample | None = None
    end_sample: ProcSample | None = None
    samples: list[dict[str, float]] = field(default_factory=list)
    leases: dict[str, int] | None = None
    exit_code: int | None = None
    refused: str | None = None  # the gateway would not start with this configuration
    failed: str | None = None  # the target could not be run
    notes: list[str] = field(default_factory=list)
    #: Checks of the run that failed (the exit status is then 1), e.g. tunnels that did not open.
    problems: list[str] = field(default_factory=list)
    #: idle-tunnels: the figures (see `loadtest.idle`).
    idle: dict[str, Any] | None = None

    @property
    def cpu_per_unit(self) -> float | None:
        if self.cpu is None or self.load is None:
            return None
        if self.unit == "cpu-s/GB":
            return self.cpu / (self.load.bytes / 1e9) if self.load.bytes else None
        return self.cpu / self.load.requests * 1e6 if self.load.requests else None

    @property
    def leaked(self) -> int:
        return self.leases["leaked"] if self.leases else 0

    def to_json(self) -> dict[str, Any]:
        load = self.load
        record: dict[str, Any] = {
            "target": self.target,
            "label": self.label,
            "round": self.round,
            "unit": self.unit,
            "refused": self.refused,
            "failed": self.failed,
            "notes": self.notes,
            "problems": self.problems,
            "exit_code": self.exit_code,
            "leases": self.leases,
        }
        if self.idle is not None:
            record["idle_tunnels"] = self.idle
        if load is not None:
            hist = load.histogram
            record |= {
                "requests": load.requests,
                "requests_total": load.total_requests,
                "seconds": load.seconds,
                "requests_per_s": load.rate,
                "bytes": load.bytes,
                "bytes_per_s": load.bytes_rate,
                "latency_us": {
                    **{k: v / 1e3 for k, v in hist.percentiles(PERCENTILES).items()},
                    "max": hist.max / 1e3,
                    "mean": hist.mean / 1e3,
                },
                "histogram_ns": hist.to_json(),
                "errors": dict(load.errors),
                "errors_in_window": load.window_errors,
                "connections_opened": load.connections_opened,
                "cancelled_at_end": load.cancelled,
                "sticky": load.sticky_summary(),
                "timeline": load.timeline,
            }
        record["cpu_seconds"] = self.cpu
        record["cpu_per_unit"] = self.cpu_per_unit
        if self.end_sample is not None:
            record["peak_rss_bytes"] = self.end_sample.hwm
            record["rss_end_bytes"] = self.end_sample.rss
            record["fds_end"] = self.end_sample.fds
            record["threads_end"] = self.end_sample.threads
        if self.start_sample is not None:
            record["rss_window_start_bytes"] = self.start_sample.rss
            record["fds_window_start"] = self.start_sample.fds
        if self.samples:
            record["process_samples"] = self.samples
        return record


def gateway_config(options: Options, urls: tuple[str, ...], storage: str) -> GatewayConfig:
    overrides: dict[str, Any] = {**options.scenario.gateway, **options.gateway}
    return GatewayConfig(upstreams=urls, storage=storage, **overrides)


def plan_for(options: Options, rig: Rig, listen: tuple[str, int]) -> Plan:
    scenario = options.scenario
    port = rig.origin.tls_port if options.tls else rig.origin.port
    if port is None:
        raise TargetError("the origin has no TLS port (is openssl installed?)")
    path = f"/bytes/{options.body}" if options.body > 0 else "/who"
    return Plan(
        scenario.mode,
        listen,
        (rig.origin.host, port),
        path,
        keepalive=options.keepalive,
        tls=options.tls,
        cafile=rig.origin.cafile,
    )


async def _faults(rig: Rig, steps: list[FaultStep], log: Callable[[str], None]) -> None:
    started = asyncio.get_running_loop().time()
    for step in sorted(steps, key=lambda s: s.at):
        await asyncio.sleep(max(0.0, started + step.at - asyncio.get_running_loop().time()))
        await rig.apply(step.upstreams, step.toxics)
        log(f"fault at {step.describe()}")


async def sampler(running: Running, into: list[dict[str, float]]) -> None:
    """The target's RSS, fds, threads, and tasks where counted, twice a second (the soak
    scenario's evidence)."""
    started = asyncio.get_running_loop().time()
    while True:
        found = running.sample()
        if found is not None:
            record = {
                "t": round(asyncio.get_running_loop().time() - started, 2),
                "rss_bytes": float(found.rss),
                "fds": float(found.fds),
                "threads": float(found.threads),
                "cpu_seconds": found.cpu,
            }
            tasks = running.tasks()
            if tasks is not None:
                record["tasks"] = float(tasks)
            into.append(record)
        await asyncio.sleep(0.5)


async def drain_check(running: Running, wait: float) -> dict[str, int]:
    """Leases from /api/stats once the load has stopped: poll until none is held, or `wait`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        stats = await running.stats() or {"pools": {}}
        pools = stats["pools"].values()
        held = sum(int(p["leases_held"]) for p in pools)
        acquired = sum(int(p["total_leases"]) for p in pools)
        if held == 0 or loop.time() >= deadline:
            return {
                "acquired": acquired,
                "released": acquired - held,
                "held_after_drain": held,
                "leaked": held,
            }
        await asyncio.sleep(0.1)


async def start_target(
    name: str, options: Options, rig: Rig, config: GatewayConfig, workdir: Path
) -> Running:
    if is_proxygate(name):
        build = options.builds.get(name)
        return await start_proxygate(
            config,
            workdir,
            ready_timeout=60.0 + len(config.upstreams) / 1000.0,
            count_tasks=options.scenario.count_tasks,
            name=name,
            python=None if build is None else build.python,
        )
    if name == "direct":
        return start_direct(rig.upstreams[0])
    return await start_peer(name, rig.upstreams, workdir)


async def measure(
    name: str,
    label: str,
    round_: int,
    options: Options,
    rig: Rig,
    config: GatewayConfig,
    log: Callable[[str], None],
) -> TargetRun:
    scenario = options.scenario
    run = TargetRun(name, label, round_, scenario.unit)
    workdir = options.workdir / f"{name}-{label or 'run'}-{round_}".replace("/", "_")
    try:
        running = await start_target(name, options, rig, config, workdir)
    except GatewayRefused as exc:
        run.refused = str(exc)
        return run
    except TargetError as exc:
        run.failed = str(exc)
        return run
    if options.pin and running.pid is not None:
        running.pin({0})
    spec = LoadSpec(
        plan_for(options, rig, running.listen),
        connections=options.connections,
        duration=options.duration,
        warmup=options.warmup,
        rate=options.rate,
        max_requests=options.requests,
        timeout=options.timeout,
        sessions=options.sessions,
        who=options.body == 0,
    )
    samples: dict[str, ProcSample | None] = {}

    def marks(edge: str) -> None:
        samples[edge] = running.sample()

    background: list[asyncio.Task[None]] = []
    if options.faults:
        background.append(asyncio.create_task(_faults(rig, options.faults, log), name="faults"))
    if running.pid is not None:
        background.append(asyncio.create_task(sampler(running, run.samples), name="sampler"))
    progress = options.progress
    try:
        if options.loadgen == "wrk":
            run.load = await run_wrk(spec, marks, log_dir=workdir)
        else:
            run.load = await run_load(
                spec,
                marks,
                (lambda p: progress(f"{name} {label}".strip(), p)) if progress else None,
            )
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if options.faults:
            await rig.apply(tuple(range(len(rig.upstreams))), Toxics())
        start, end = samples.get("start"), samples.get("end")
        run.start_sample, run.end_sample = start, running.sample() or end
        if start is not None and end is not None:
            run.cpu = end.cpu - start.cpu
        if is_proxygate(name):
            # Sessions keep their leases until idle for sticky_ttl; the sweeper then takes them.
            wait = options.drain_wait + (config.sticky_ttl if options.sessions else 0.0)
            try:
                run.leases = await drain_check(running, wait)
            except (OSError, TargetError, TimeoutError, KeyError) as exc:
                run.notes.append(f"could not read /api/stats after the load: {exc}")
        run.exit_code = await running.stop()
    if is_proxygate(name) and run.exit_code not in (0, None):
        run.notes.append(f"{name} exited with status {run.exit_code} on SIGTERM")
    return run


def fleet_urls(rig: Rig, size: int | None = None) -> tuple[str, ...]:
    """The pool's upstream URLs. For a pool larger than the fleet, each fleet upstream appears
    under many user names (any credentials will do for it): distinct upstreams to the gateway."""
    if size is None:
        return tuple(u.url for u in rig.upstreams)
    fleet = rig.upstreams
    return tuple(
        f"{fleet[i % len(fleet)].kind}://u{i}:x@{fleet[i % len(fleet)].host}:"
        f"{fleet[i % len(fleet)].port}"
        for i in range(size)
    )


async def run_scenario(options: Options, log: Callable[[str], None]) -> tuple[Rig, list[TargetRun]]:
    """Every target run of the scenario, in order. The rig is stopped before returning."""
    scenario = options.scenario
    spec = {
        "origin": options.origin,
        "sizes": sorted({options.body, 128, 1024}),
        "fleet": options.fleet,
        "kinds": [scenario.kind] * options.upstreams,
        "cpus": sorted(rest_cpus()) if options.pin else [],
    }
    rig = await Rig.start(spec, options.workdir)
    runs: list[TargetRun] = []
    try:
        if scenario.name == "storage":
            for url in options.storages:
                async with scratch_storage(url, options.workdir) as scratch:
                    config = gateway_config(options, fleet_urls(rig), scratch)
                    runs.append(await measure("proxygate", url, 1, options, rig, config, log))
        elif scenario.name == "scale":
            # Sizes alternate round by round, so a busier moment of the machine falls on
            # each of them alike.
            for round_ in range(1, options.rounds + 1):
                for size in options.pool_sizes:
                    config = gateway_config(options, fleet_urls(rig, size), "memory://")
                    label = f"pool {size}"
                    runs.append(
                        await measure("proxygate", label, round_, options, rig, config, log)
                    )
        else:
            config = gateway_config(options, fleet_urls(rig), "memory://")
            for round_ in range(1, options.rounds + 1):
                for name in ["proxygate", *options.compare]:
                    runs.append(await measure(name, "", round_, options, rig, config, log))
    finally:
        await rig.stop()
    return rig, runs


def rest_cpus() -> set[int]:
    """Every CPU but 0 (which the target gets), or all of them on a one-CPU machine."""
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    rest = cpus - {0}
    return rest or cpus


def pin_harness(enabled: bool) -> set[int] | None:
    """Move this process off CPU 0; the affinity to restore afterwards (None: unchanged)."""
    if not enabled or not hasattr(os, "sched_getaffinity"):
        return None
    before = set(os.sched_getaffinity(0))
    if len(before) < 2 or not set_affinity(0, rest_cpus()):
        return None
    return before


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def aggregate(runs: list[TargetRun]) -> dict[str, Any]:
    """One target's rounds as one row: medians of the figures, latency from all rounds."""
    measured = [r for r in runs if r.load is not None]
    hist = Histogram()
    errors: Counter[str] = Counter()
    for r in measured:
        assert r.load is not None
        hist.merge(r.load.histogram)
        errors.update(r.load.errors)
    per_unit = [v for r in measured if (v := r.cpu_per_unit) is not None]
    return {
        "target": runs[0].target,
        "label": runs[0].label,
        "rounds": len(measured),
        "requests_per_s": median([r.load.rate for r in measured if r.load]),
        "bytes_per_s": median([r.load.bytes_rate for r in measured if r.load]),
        "cpu_per_unit": median(per_unit),
        "unit": runs[0].unit,
        "latency_us": {k: v / 1e3 for k, v in hist.percentiles(PERCENTILES).items()},
        "errors": dict(errors),
        "peak_rss_bytes": max(
            (r.end_sample.hwm for r in measured if r.end_sample is not None), default=None
        ),
        "leaked": max((r.leaked for r in runs), default=0),
        "refused": next((r.refused for r in runs if r.refused), None),
        "failed": next((r.failed for r in runs if r.failed), None),
    }
