"""The `proxygate` command: `run` (with `--workers N`, see `gateway.workers`), `check`, and
`db upgrade`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import resource
import signal
import sys
from collections.abc import Sequence

from config import ConfigError, Overrides, Settings, load_settings, redact_url
from core.storage.memory import MemoryStorage
from gateway.app import Gateway, StartupError, describe_storage_error, open_storage
from gateway.check_command import run_check
from gateway.workers import WorkerRole, supervise, workers_refusal

__all__ = ["main"]

#: The open files limit asked for when the hard limit is "unlimited" (Linux's usual ceiling).
_OPEN_FILES_WITHOUT_LIMIT = 1 << 20

log = logging.getLogger("proxygate")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"proxygate: configuration error: {exc}", file=sys.stderr)
        return 2
    role = None if getattr(args, "worker_of", None) is None else WorkerRole.parse(args.worker_of)
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
    if role is None and args.workers > 1:
        if refusal := workers_refusal(settings, args.workers):
            print(f"proxygate: cannot start: {refusal}", file=sys.stderr)
            return 1
        drain = settings.gateway.drain_timeout
        return runner(supervise(argv, args.workers, drain_timeout=drain))
    _raise_open_files_limit()
    try:
        return runner(_run(settings, role))
    except StartupError as exc:
        print(f"proxygate: cannot start: {exc}", file=sys.stderr)
        return 1


async def _run(settings: Settings, role: WorkerRole | None = None) -> int:
    if role is not None:
        settings = role.settings_for(settings)
    gateway = Gateway(
        settings, reuse_port=role is not None, serve_admin=role is None or role.serves_admin
    )
    await gateway.start()
    # What start-up built (a catalog of up to 100,000s of upstreams) lives as long as the
    # process: out of the collector's sight, full collections stay short under load.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def request_stop(signame: str) -> None:
        if not stopping:
            log.info("%s received: draining for up to %gs", signame, settings.gateway.drain_timeout)
            stopping.append(loop.create_task(gateway.stop(), name="graceful-stop"))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    watch: asyncio.Task[None] | None = None
    if role is not None:
        role.report_ready()
        watch = loop.create_task(
            role.watch_parent(lambda: request_stop("the parent's exit")), name="parent-watch"
        )
    await gateway.serve_until_stopped()
    if watch is not None:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    log.info("stopped")
    return 0


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
