"""`python -m loadtest SCENARIO [options]` (or `proxygate-loadtest`): see loadtest/README.md.

Exit status: 0 when every run finished and no lease leaked; 1 when a lease was still held
after the drain wait, the gateway did not exit cleanly, or a run failed; 2 for bad options
(a `--compare ref:REF` that does not resolve or install included); 3 when the gateway, or
another build of it, refused a configuration (the `storage` scenario with a storage it does
not support, an older build a key it does not know).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from loadtest import builds, idle, procs, report, wrk
from loadtest.peers import PEERS, ensure
from loadtest.rig import RigError
from loadtest.runner import Options, TargetRun, aggregate, pin_harness, run_scenario
from loadtest.scenarios import SCENARIOS, Scenario, default_faults
from loadtest.targets import TargetError
from loadtest.toxics import ToxicError, parse_step

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
DEFAULT_POOL_SIZES = "10,1000,100000"
#: Scenarios whose targets alternate in rounds on one configuration: where another build fits.
NO_BUILDS = ("storage", "scale", "idle-tunnels")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load and fault harness for proxygate, on loopback, bounded in time.",
        epilog="scenarios: "
        + "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values())
        + "; and `crash-hunt --help`: the gateway under faults, aborts and outages",
    )
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    load = parser.add_argument_group("load")
    load.add_argument("--duration", type=float, help="measured seconds (default: per scenario)")
    load.add_argument("--warmup", type=float, help="seconds before measuring")
    load.add_argument("--connections", "-c", type=int, help="clients (open loop: most in flight)")
    load.add_argument("--rate", type=float, help="open loop at this many requests/s")
    load.add_argument("--requests", type=int, help="stop after this many requests")
    load.add_argument("--body-size", type=int, help="response body bytes (0: /who)")
    load.add_argument("--keepalive", action=argparse.BooleanOptionalAction, default=None)
    load.add_argument("--tls", action="store_true", help="TLS to the origin (tunnels only)")
    load.add_argument("--timeout", type=float, help="seconds per request")
    load.add_argument("--sessions", type=int, help="sticky sessions to spread requests over")
    load.add_argument("--sticky-ttl", type=float, help="the pool's session idle TTL, seconds")
    load.add_argument("--tunnels", type=int, help="idle-tunnels: how many to hold open")
    load.add_argument(
        "--loadgen",
        choices=("builtin", "wrk"),
        default="builtin",
        help="the load generator: the harness's own, or wrk where installed "
        f"({', '.join(wrk.ALLOWED_SCENARIOS)})",
    )
    rig = parser.add_argument_group("rig")
    rig.add_argument("--upstreams", type=int, help="upstreams in the fleet")
    rig.add_argument("--fleet", choices=("sim", "debian"), default="sim")
    rig.add_argument("--origin", choices=("builtin", "nginx"), default="builtin")
    rig.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="AT:UPSTREAMS:SPEC",
        help="a fault step, e.g. 2:0-1:down or 3:all:latency=100 (repeatable)",
    )
    rig.add_argument("--no-pin", action="store_true", help="do not pin the gateway to CPU 0")
    peers = parser.add_argument_group("compare and variants")
    peers.add_argument(
        "--compare",
        default="",
        help="comma list of pproxy, proxy.py, direct, floor, and ref:GITREF (another build of "
        "proxygate, e.g. ref:HEAD~3, installed into a cached venv of its own)",
    )
    peers.add_argument("--rounds", type=int, default=None, help="alternating rounds")
    peers.add_argument(
        "--storage", action="append", default=[], metavar="URL", help="storage scenario URLs"
    )
    peers.add_argument("--pool-sizes", default=DEFAULT_POOL_SIZES, help="scale scenario sizes")
    peers.add_argument(
        "--upstream-keepalive",
        type=int,
        default=None,
        metavar="N",
        help="kept upstream connections per upstream (0: none; default: the gateway's, "
        "and 0 in scale)",
    )
    peers.add_argument(
        "--http-upstream-mode",
        choices=("forward", "connect"),
        default=None,
        help="plain HTTP through HTTP upstreams: absolute-form requests or kept CONNECT "
        "tunnels (default: the gateway's, forward)",
    )
    peers.add_argument(
        "--no-install", action="store_true", help="never pip-install peers or matplotlib"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="PATH", help="write every figure here")
    out.add_argument("--chart", type=Path, metavar="PNG", help="draw a chart (matplotlib)")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    out.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    out.add_argument("--drain-wait", type=float, default=5.0, help="seconds for leases to return")
    return parser


class UsageError(Exception):
    pass


def _options(args: argparse.Namespace, workdir: Path) -> Options:
    scenario: Scenario = SCENARIOS[args.scenario]
    compare = [p.strip() for p in args.compare.split(",") if p.strip()]
    try:
        peers, refs = builds.split_compare(compare)
    except builds.BuildError as exc:
        raise UsageError(str(exc)) from None
    if refs and scenario.name in NO_BUILDS:
        raise UsageError(f"{scenario.name} takes no ref: (its runs vary one gateway's setting)")
    for peer in peers:
        if peer not in scenario.compare:
            allowed = ", ".join(scenario.compare) or "nothing"
            raise UsageError(f"{scenario.name} can be compared with {allowed}, not {peer!r}")
    duration = args.duration if args.duration is not None else scenario.duration
    warmup = args.warmup if args.warmup is not None else min(scenario.warmup, duration)
    upstreams = args.upstreams or scenario.upstreams
    if args.fleet == "debian" and (scenario.name == "faults" or args.fault):
        raise UsageError("the Debian fleet takes no faults: use --fleet sim")
    try:
        faults = [parse_step(step, upstreams) for step in args.fault]
        if scenario.name == "faults" and not faults:
            faults = default_faults(warmup + duration, upstreams)
    except (ToxicError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        sizes = [int(s) for s in args.pool_sizes.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--pool-sizes {args.pool_sizes!r}: comma-separated counts") from None
    if args.storage and scenario.name != "storage":
        # Silently measuring memory:// instead would pass for a figure of the storage given.
        raise UsageError("--storage is for the storage scenario (the others run on memory://)")
    storages = args.storage or ["memory://", f"sqlite:///{workdir / 'loadtest.db'}"]
    body = args.body_size if args.body_size is not None else scenario.body
    if args.tls and scenario.mode == "http":
        raise UsageError("--tls needs a tunnel: use connect-throughput or socks5")
    sessions = args.sessions if args.sessions is not None else scenario.sessions
    tunnels = args.tunnels if args.tunnels is not None else scenario.tunnels
    _check_tunnels(args, scenario, tunnels)
    if duration <= 0 or warmup < 0 or (args.connections is not None and args.connections < 1):
        raise UsageError("--duration must be > 0, --warmup >= 0, --connections >= 1")
    if args.loadgen == "wrk":
        _check_wrk(args, scenario, sessions)
    return Options(
        scenario=scenario,
        duration=duration,
        warmup=warmup,
        connections=args.connections or scenario.connections,
        rate=args.rate,
        requests=args.requests,
        upstreams=upstreams,
        body=0 if sessions else body,
        keepalive=scenario.keepalive if args.keepalive is None else args.keepalive,
        tls=args.tls,
        origin=args.origin,
        fleet=args.fleet,
        timeout=args.timeout or scenario.timeout,
        sessions=sessions,
        compare=compare,
        rounds=args.rounds or (2 if compare else 1),
        storages=storages,
        pool_sizes=sizes,
        faults=faults,
        pin=not args.no_pin and (os.cpu_count() or 1) >= 2,
        drain_wait=args.drain_wait,
        workdir=workdir,
        gateway=_gateway_overrides(args),
        tunnels=tunnels,
        loadgen=args.loadgen,
    )


def _check_wrk(args: argparse.Namespace, scenario: Scenario, sessions: int) -> None:
    """wrk makes closed-loop plain HTTP load through a proxy, nothing else."""
    if scenario.name not in wrk.ALLOWED_SCENARIOS:
        allowed = " and ".join(wrk.ALLOWED_SCENARIOS)
        raise UsageError(f"--loadgen wrk serves {allowed}, not {scenario.name}")
    given = _given(("--rate", args.rate), ("--requests", args.requests), ("--sessions", sessions))
    if given:
        raise UsageError(f"--loadgen wrk takes no {', '.join(given)} (the built-in generator does)")
    if not wrk.available():
        raise UsageError("--loadgen wrk: wrk is not installed (Debian: apt-get install wrk)")


def _check_tunnels(args: argparse.Namespace, scenario: Scenario, tunnels: int) -> None:
    """--tunnels belongs to idle-tunnels, which has no request load to shape."""
    if scenario.name != "idle-tunnels":
        if args.tunnels is not None:
            raise UsageError("--tunnels is for the idle-tunnels scenario")
        return
    if tunnels < 1:
        raise UsageError("--tunnels must be >= 1")
    given = _given(
        ("--rate", args.rate),
        ("--requests", args.requests),
        ("--sessions", args.sessions),
        ("--fault", args.fault),
        ("--compare", args.compare),
    )
    if given:
        raise UsageError(f"idle-tunnels holds tunnels idle: {', '.join(given)} do not apply")
    # The Debian programs and nginx are configured for far fewer connections than this holds.
    if args.fleet != "sim" or args.origin != "builtin":
        raise UsageError("idle-tunnels runs on the sim fleet and the builtin origin")


def _given(*flags: tuple[str, object]) -> list[str]:
    """The flags among `(flag, value)` that were given a value."""
    return [flag for flag, value in flags if value]


def _kept_connections(options: Options) -> str:
    kept = {**options.scenario.gateway, **options.gateway}.get("keepalive_max_idle")
    if kept is None:
        return ""
    if kept == 0:
        return "; proxygate opens a new upstream connection per request"
    return f"; proxygate keeps up to {kept:g} connections per upstream"


def _http_upstream_mode(options: Options) -> str:
    mode = options.gateway.get("http_upstream_mode")
    if mode == "connect":
        return "; plain HTTP through HTTP upstreams in kept CONNECT tunnels"
    return "" if mode is None else f"; plain HTTP through HTTP upstreams: {mode}"


def _describe(options: Options) -> str:
    s = options.scenario
    if s.name == "idle-tunnels":
        return (
            f"loadtest {s.name}: {s.summary}\n"
            f"  {options.tunnels:,} CONNECT tunnels to the builtin origin"
            f"{' over TLS' if options.tls else ''}, {options.connections} opened at a time, "
            f"each proven by GET /bytes/{options.body}; {options.upstreams} or more http "
            f"upstreams (sim fleet)\n  {options.warmup:g} s before the first reading, tunnels "
            f"held idle {options.duration:g} s"
            + (
                "; proxygate pinned to CPU 0, rig and harness to the others"
                if options.pin
                else "; no CPU pinning"
            )
        )
    loop = f"open loop at {options.rate:g} req/s" if options.rate else "closed loop"
    what = f"GET /bytes/{options.body}" if options.body else "GET /who"
    return (
        f"loadtest {s.name}: {s.summary}\n"
        f"  {options.upstreams} {s.kind} upstreams ({options.fleet} fleet), {options.origin} "
        f"origin{' over TLS' if options.tls else ''}; client {s.mode}, {options.connections} "
        f"connections, {loop}, {'keep-alive' if options.keepalive else 'new connection'} "
        f"per request, {what}"
        + (f", {options.sessions} sessions" if options.sessions else "")
        + _kept_connections(options)
        + _http_upstream_mode(options)
        + ("; load from wrk" if options.loadgen == "wrk" else "")
        + f"\n  {options.warmup:g} s warm-up + {options.duration:g} s measured"
        + (f", at most {options.requests:,} requests" if options.requests else "")
        + (f"; {options.rounds} alternating round(s)" if options.compare else "")
        + (
            "; proxygate pinned to CPU 0, rig and load generator to the others"
            if options.pin
            else "; no CPU pinning"
        )
    )


def _exit_code(runs: list[TargetRun], problems: list[str]) -> int:
    code = EXIT_OK
    for run in runs:
        if not builds.is_proxygate(run.target):
            continue
        if run.refused:
            problems.append(
                f"{run.target} refused {run.label or 'its configuration'}: {run.refused}"
                + _refusal_hint(run)
            )
            code = max(code, EXIT_REFUSED)
        if run.failed:
            name = f"{run.target} {run.label}".strip()
            problems.append(f"{name} could not run: {run.failed}")
            code = max(code, EXIT_FAILED)
        if run.leaked:
            problems.append(
                f"LEAK: {run.leaked} lease(s) still held {run.label} round {run.round} after "
                "the drain wait"
            )
            code = max(code, EXIT_FAILED)
        if run.exit_code not in (0, None):
            problems.append(f"{run.target} exited with status {run.exit_code} on SIGTERM")
            code = max(code, EXIT_FAILED)
        if run.problems:
            problems.extend(f"FAILED: {problem}" for problem in run.problems)
            code = max(code, EXIT_FAILED)
    return code


def _refusal_hint(run: TargetRun) -> str:
    """Another build reads the configuration written for this tree's gateway."""
    if run.target == "proxygate":
        return ""
    why = "does not know a key of it" if "unknown" in (run.refused or "") else "refuses it"
    return f" (the configuration is written for this tree's gateway; that build {why})"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["crash-hunt"]:
        # Not a load scenario: many gateway runs judged by their processes (its own options).
        from loadtest import crash_hunt

        return crash_hunt.main(argv[1:])
    args = _parser().parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix=f"loadtest-{args.scenario}-"))
    try:
        return _main(args, workdir)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _gateway_overrides(args: argparse.Namespace) -> dict[str, float | int | str]:
    overrides: dict[str, float | int | str] = {}
    if args.sticky_ttl is not None:
        overrides["sticky_ttl"] = args.sticky_ttl
    if args.upstream_keepalive is not None:
        if args.upstream_keepalive < 0:
            raise UsageError("--upstream-keepalive must be 0 or more")
        overrides["keepalive_max_idle"] = args.upstream_keepalive
    if args.http_upstream_mode is not None:
        overrides["http_upstream_mode"] = args.http_upstream_mode
    return overrides


def _main(args: argparse.Namespace, workdir: Path) -> int:
    try:
        options = _options(args, workdir)
    except UsageError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    not_measured: list[str] = []
    try:
        options.compare, options.builds = builds.prepare_all(
            options.compare, install=not args.no_install
        )
    except builds.BuildError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for peer in list(options.compare):
        if peer in PEERS:
            python, why = ensure(PEERS[peer], install=not args.no_install)
            if python is None:
                not_measured.append(f"{peer}: {why}")
                options.compare.remove(peer)
    progress = report.ProgressLine(sys.stderr, args.quiet)
    options.progress = progress
    report.say(_describe(options))
    for note in not_measured:
        report.say(f"  NOT MEASURED {note}")
    if options.builds:
        report.say(f"  builds: proxygate = this tree ({_this_build()})")
        for build in options.builds.values():
            report.say(f"          {build.describe()}")
    restore = pin_harness(options.pin)
    procs.keep_freed_memory()  # this process is the load generator
    started = time.time()
    try:
        runs = _run(options, args.quiet)
    except (RigError, TargetError, wrk.WrkError) as exc:
        progress.done()
        print(f"loadtest: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if restore is not None:
            os.sched_setaffinity(0, restore)
    progress.done()
    return _finish(args, options, runs, not_measured, started)


def _run(options: Options, quiet: bool) -> list[TargetRun]:
    def log(text: str) -> None:
        if not quiet:
            print(f"\n  {text}" if sys.stderr.isatty() else f"  {text}", file=sys.stderr)

    async def runs() -> list[TargetRun]:
        if options.scenario.name == "idle-tunnels":
            return await idle.run_idle(options, log)
        return (await run_scenario(options, log))[1]

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        return asyncio.run(runs())
    return uvloop.run(runs())


def _finish(
    args: argparse.Namespace,
    options: Options,
    runs: list[TargetRun],
    not_measured: list[str],
    started: float,
) -> int:
    scenario = options.scenario.name
    report.say("")
    if scenario == "idle-tunnels":
        for run in runs:
            for line in idle.report_lines(run):
                report.say(line)
    else:
        report.say(report.table(runs))
    errors = report.errors_text(runs)
    if errors:
        report.say("errors by kind:")
        for line in errors:
            report.say(line)
    for run in runs:
        for note in run.notes:
            report.say(f"note: {run.target} {run.label}: {note}")
        sticky = run.load.sticky_summary() if run.load is not None else None
        if sticky is not None:
            report.say(
                f"sticky: {sticky['sessions']} sessions, {sticky['moved']} seen on more than "
                "one upstream"
            )
    if scenario == "soak":
        for line in _soak_lines(runs, options.warmup):
            report.say(line)
    # Asked to compare: the compare line, with "n/a" for a peer that could not be measured.
    asked = [p.strip() for p in args.compare.split(",") if p.strip()]
    if options.compare:
        report.say("compared with proxygate (medians over rounds):")
        # A build that refused the configuration has no figures to set beside ours.
        for line in report.compare_lines([r for r in runs if not r.refused]):
            report.say(line)
        refused = [r.target for r in runs if r.refused and r.target in options.builds]
        for label in dict.fromkeys(refused):
            report.say(f"  {label}: NOT MEASURED: it refused the configuration (below)")
    problems: list[str] = []
    code = _exit_code(runs, problems)
    leases = [r.leases for r in runs if builds.is_proxygate(r.target) and r.leases]
    if leases:
        verdict = "FAILED" if any(lease["leaked"] for lease in leases) else "passed"
        report.say(
            f"zero-leak check {verdict}: "
            + "; ".join(
                f"acquired {lease['acquired']:,}, released {lease['released']:,}, "
                f"still held {lease['leaked']}"
                for lease in leases
            )
        )
    for problem in problems:
        report.say(problem)
    if scenario == "idle-tunnels":
        last = idle.summary_line(runs)
    elif options.builds and "pproxy" not in asked:
        last = _builds_summary(scenario, runs, next(iter(options.builds)))
    else:
        last = report.summary_line(scenario, runs, asked)
    document = {
        "scenario": scenario,
        "started_at": started,
        "python": platform.python_version(),
        "options": {
            k: v
            for k, v in vars(options).items()
            if k not in ("scenario", "progress", "workdir", "faults", "builds")
        },
        "builds": {label: build.to_json() for label, build in options.builds.items()},
        "faults": [step.describe() for step in options.faults],
        "not_measured": not_measured,
        "runs": [run.to_json() for run in runs],
        "problems": problems,
        "exit_code": code,
        "summary_line": last,
    }
    if args.json is not None or args.chart is not None:
        path = args.json or (options.workdir / "results.json")
        report.write_json(path, document)
        if args.json is not None:
            report.say(f"results written to {args.json}")
        if args.chart is not None:
            report.say(report.draw_chart(path, args.chart, install=not args.no_install))
    report.say(last)
    return code


def _this_build() -> str:
    """Whether the gateway this tree runs has its request path compiled (mypyc's extensions
    beside the sources, where the editable install imports from)."""
    lane = Path(__file__).resolve().parents[1] / "gateway"
    return "compiled" if any(lane.glob("http_lane.*.so")) else "pure Python"


def _builds_summary(scenario: str, runs: list[TargetRun], label: str) -> str:
    """The last line when another build, not pproxy, is what this tree is compared with."""
    mine = [r for r in runs if r.target == "proxygate"]
    theirs = [r for r in runs if r.target == label]
    ours_cost = aggregate(mine)["cpu_per_unit"] if mine else None
    their_cost = aggregate(theirs)["cpu_per_unit"] if theirs else None
    unit = runs[0].unit if runs else "us/req"
    digits = 2 if unit == "cpu-s/GB" else 1

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    ratio = f"{ours_cost / their_cost:.2f}" if ours_cost and their_cost else "n/a"
    return (
        f"{scenario}: proxygate {fmt(ours_cost)} {unit}, {label} {fmt(their_cost)} {unit}, "
        f"ratio {ratio}"
    )


def _soak_lines(runs: list[TargetRun], warmup: float) -> list[str]:
    """RSS, fds, threads and tasks from the end of the warm-up to the end of the run."""
    out = []
    for run in runs:
        samples = run.samples
        if not builds.is_proxygate(run.target) or len(samples) < 2:
            continue
        after = [s for s in samples if s["t"] >= warmup] or samples
        first, last = after[0], samples[-1]
        growth = (last["rss_bytes"] - first["rss_bytes"]) / first["rss_bytes"] * 100
        tasks = [s["tasks"] for s in after if "tasks" in s]
        out.append(
            f"soak: RSS {first['rss_bytes'] / 2**20:.1f} -> {last['rss_bytes'] / 2**20:.1f} MiB "
            f"after warm-up ({growth:+.1f}%), fds {first['fds']:.0f} -> {last['fds']:.0f}, "
            f"threads {first['threads']:.0f} -> {last['threads']:.0f}, "
            + (
                f"asyncio tasks {tasks[0]:.0f} -> {tasks[-1]:.0f} (range {min(tasks):.0f}-"
                f"{max(tasks):.0f})"
                if tasks
                else "asyncio tasks not counted"
            )
        )
    return out
