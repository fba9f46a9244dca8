"""The `proxygate` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from config import ConfigError, Overrides, Settings, load_settings
from gateway.app import Gateway, StartupError
from gateway.check_command import run_check

__all__ = ["main"]

log = logging.getLogger("proxygate")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"proxygate: configuration error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.gateway.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        runner = asyncio.run
    else:
        runner = uvloop.run
    if args.command == "check":
        check = run_check(settings, args.pool, as_json=args.json, out=sys.stdout, err=sys.stderr)
        return runner(check)
    try:
        return runner(_run(settings))
    except StartupError as exc:
        print(f"proxygate: cannot start: {exc}", file=sys.stderr)
        return 1


async def _run(settings: Settings) -> int:
    gateway = Gateway(settings)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def request_stop(signame: str) -> None:
        if not stopping:
            log.info("%s received: draining for up to %gs", signame, settings.gateway.drain_timeout)
            stopping.append(loop.create_task(gateway.stop(), name="graceful-stop"))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    await gateway.serve_until_stopped()
    log.info("stopped")
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
    run.add_argument("--storage", metavar="URL", help="memory:// (default)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
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


def _overrides(args: argparse.Namespace) -> Overrides:
    return Overrides(
        listen=tuple(getattr(args, "listen", ())),
        upstreams=tuple(args.upstream),
        proxies_file=args.proxies_file,
        admin=getattr(args, "admin", None),
        log_level=args.log_level,
        storage_url=getattr(args, "storage", None),
    )


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
