"""The `proxygate` command: `run` (with `--workers N`, see `gateway.workers`), `check`, and
`db upgrade`.

`run` exits 0 when SIGTERM or SIGINT stopped it, after draining for up to `gateway.drain_timeout`;
2 for a bad configuration or a listener that cannot bind its address (one line on stderr); 1
for anything else. A stop never takes much longer than the drain: `EXIT_GRACE` seconds past it,
a watchdog thread logs the tasks still running and ends the process, status 1, whatever the
event loop is doing. In a single gateway a second signal while draining does so at once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import resource
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from config import ConfigError, Overrides, Settings, load_settings, redact_url
from core.storage.memory import MemoryStorage
from gateway.app import Gateway, ListenError, StartupError, describe_storage_error, open_storage
from gateway.check_command import run_check
from gateway.watchdog import StopWatchdog, describe_tasks
from gateway.workers import EXIT_GRACE, STOP_GRACE, WorkerRole, supervise, workers_refusal

__all__ = ["main"]

#: The open files limit asked for when the hard limit is "unlimited" (Linux's usual ceiling).
_OPEN_FILES_WITHOUT_LIMIT = 1 << 20

log = logging.getLogger("proxygate")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    role = None if getattr(args, "worker_of", None) is None else WorkerRole.parse(args.worker_of)
    if role is not None and not role.die_with_parent():
        print(f"proxygate: worker {role.index}: the parent exited before it", file=sys.stderr)
        return 1
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"proxygate: configuration error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.gateway.log_level, role)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        runner = asyncio.run
    else:
        runner = uvloop.run
    if args.command == "check":
        check = run_check(settings, args.pool, as_json=args.json, out=sys.stdout, err=sys.stderr)
        return runner(check)
    if args.command == "db":
        return runner(_upgrade_database(settings.storage.url))
    drain = settings.gateway.drain_timeout
    if role is None and args.workers > 1:
        if refusal := workers_refusal(settings, args.workers):
            print(f"proxygate: cannot start: {refusal}", file=sys.stderr)
            return 1
        with StopWatchdog(drain + STOP_GRACE + EXIT_GRACE) as watchdog:
            return runner(supervise(argv, args.workers, drain_timeout=drain, on_stop=watchdog.arm))
    _raise_open_files_limit()
    try:
        with StopWatchdog(drain + EXIT_GRACE) as watchdog:
            return runner(_run(settings, role, watchdog))
    except ListenError as exc:
        print(f"proxygate: cannot start: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"proxygate: cannot start: {exc}", file=sys.stderr)
        return 1


async def _run(settings: Settings, role: WorkerRole | None, watchdog: StopWatchdog) -> int:
    if role is not None:
        settings = role.settings_for(settings)
    gateway = Gateway(
        settings, reuse_port=role is not None, serve_admin=role is None or role.serves_admin
    )
    try:
        await gateway.start()
        # What start-up built (a catalog of up to 100,000s of upstreams) lives as long as the
        # process: out of the collector's sight, full collections stay short under load.
        gc.collect()
        gc.freeze()
        await _serve(gateway, role, watchdog)
        await _end_leftover_tasks()
    finally:
        # However the run ends, the event loop's own shutdown after it is bounded too: it
        # cancels the tasks left, and waits for each to end.
        watchdog.arm("the end of the run")
    log.info("stopped")
    return 0


async def _serve(gateway: Gateway, role: WorkerRole | None, watchdog: StopWatchdog) -> None:
    """Serve until SIGTERM or SIGINT (a worker: or its parent's exit), then drain.

    Signals after the first do not wait for the drain in a single gateway: the process exits at
    once, status 1. A worker only notes them: its parent, a terminal's Ctrl-C and a service
    manager may each send one for the same stop, and its watchdog bounds the drain anyway.
    """
    loop = asyncio.get_running_loop()
    drain = gateway.settings.gateway.drain_timeout
    #: This function's own tasks by name, every one ended before it returns.
    tasks: dict[str, asyncio.Task[None]] = {}

    def request_stop(cause: str) -> None:
        if "graceful-stop" in tasks:
            if role is None:
                watchdog.fire(f"{cause} received while draining")
            log.info(
                "%s received while draining: the drain goes on (until %gs after the first stop "
                "at the latest)",
                cause,
                watchdog.timeout,
            )
            return
        log.info("%s received: draining for up to %gs", cause, drain)
        watchdog.arm(cause)
        tasks["graceful-stop"] = loop.create_task(gateway.stop(), name="graceful-stop")

    def on_signal(signame: str) -> None:
        # The kernel signals a worker whose parent exited (see `WorkerRole.die_with_parent`).
        orphaned = role is not None and not role.parent_alive()
        request_stop("the parent's exit" if orphaned else signame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    if role is not None:
        role.report_ready()
        tasks["parent-watch"] = loop.create_task(
            role.watch_parent(lambda: request_stop("the parent's exit")), name="parent-watch"
        )
    try:
        await gateway.serve_until_stopped()
        if stopping := tasks.get("graceful-stop"):
            await stopping  # its failure is the run's
    finally:
        await _end_tasks(tasks.values())


async def _end_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until each has ended (bounded by the watchdog, should one refuse)."""
    ending = list(tasks)
    for task in ending:
        task.cancel()
    await asyncio.gather(*ending, return_exceptions=True)


async def _end_leftover_tasks() -> None:
    """End the tasks still running once the gateway has stopped, naming them: code that started
    a task and did not wait for it at its own close. The event loop's shutdown would cancel them
    all the same, without a word."""
    current = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not current]
    if left:
        log.warning("still running after the stop, cancelled: %s", describe_tasks(left))
        await _end_tasks(left)


async def _upgrade_database(url: str) -> int:
    """`proxygate db upgrade`: bring the storage database to the newest schema, say how."""
    shown = redact_url(url)
    try:
        if isinstance(open_storage(url), MemoryStorage):
            print(f"{shown}: memory storage keeps no schema; nothing to upgrade")
            return 0
        from core.storage.sql import schema_status, upgrade  # SQLAlchemy for SQL storage only

        before = await schema_status(url)
        after = await upgrade(url)
    except StartupError as exc:
        print(f"proxygate: cannot upgrade: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        reason = describe_storage_error(exc, url)
        if reason is None:
            raise
        print(f"proxygate: cannot upgrade the storage at {shown}: {reason}", file=sys.stderr)
        return 1
    if before.current == after.current:
        print(f"{shown}: already up to date (revision {after.current})")
    else:
        print(f"{shown}: upgraded from {before.current or 'an empty database'} to {after.current}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxygate", description="A forward HTTP/SOCKS proxy gateway over upstream pools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file")
    run.add_argument(
        "--listen", action="append", default=[], metavar="ADDR", help="HOST:PORT (repeatable)"
    )
    run.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="URL",
        help="an upstream proxy URL for the default pool (repeatable)",
    )
    run.add_argument("--proxies-file", metavar="FILE", help="upstreams, one per line")
    run.add_argument("--admin", metavar="ADDR", help='admin HOST:PORT ("" disables it)')
    run.add_argument(
        "--storage",
        metavar="URL",
        help="memory:// (default), sqlite:///path.db or postgresql://user:pw@host/db",
    )
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="N processes on the same ports, sharing SQL storage (admin API on the first)",
    )
    # Set by `--workers` on the processes it starts: INDEX:READY_FD:LIFELINE_FD.
    run.add_argument("--worker-of", help=argparse.SUPPRESS)
    db = commands.add_parser("db", help="manage the storage database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser(
        "upgrade", help="bring the storage database's schema to this version's"
    )
    upgrade.add_argument("--config", metavar="FILE", help="TOML configuration file")
    upgrade.add_argument("--storage", metavar="URL", help="the storage URL (over the config's)")
    upgrade.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    check = commands.add_parser(
        "check", help="run the active checks once over the configured upstreams"
    )
    check.add_argument("--config", metavar="FILE", help="TOML configuration file")
    check.add_argument("--pool", metavar="NAME", help="only this pool's upstreams")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="URL",
        help="an upstream proxy URL for the default pool (repeatable)",
    )
    check.add_argument("--proxies-file", metavar="FILE", help="upstreams, one per line")
    check.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _overrides(args: argparse.Namespace) -> Overrides:
    return Overrides(
        listen=tuple(getattr(args, "listen", ())),
        upstreams=tuple(getattr(args, "upstream", ())),
        proxies_file=getattr(args, "proxies_file", None),
        admin=getattr(args, "admin", None),
        log_level=args.log_level,
        storage_url=getattr(args, "storage", None),
    )


def _configure_logging(level: str, role: WorkerRole | None) -> None:
    worker = "" if role is None else f"worker-{role.index} "
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {worker}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "debug":
        # Alembic tells of every plugin it loads at info; `db upgrade` says what it did itself.
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _raise_open_files_limit() -> None:
    """Every tunnel holds two open files: take the soft limit up to the hard one (often 1,024
    against 500,000 or more), or a busy gateway refuses clients at a few hundred tunnels."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = _OPEN_FILES_WITHOUT_LIMIT
    if soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files limit stays at %d (hard limit %d): %s", soft, hard, exc)
        return
    log.debug("open files limit raised from %d to %d", soft, hard)
