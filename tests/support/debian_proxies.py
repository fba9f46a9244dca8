"""Debian's real proxy servers as honest upstreams: `microsocks` (SOCKS5) and `tinyproxy` (HTTP).

    async with run_microsocks(egress="127.0.0.11", auth=("u", "p")) as proxy:
        proxy.url  # "socks5://u:p@127.0.0.1:PORT"

Each runs as a subprocess listening on a free port of 127.0.0.1 and dialing targets from
`egress`. Starting waits (5 s at most) until the port accepts connections, else raises
`ProxyStartError` with the program's output; leaving the block terminates the process by its
pid (then kills it after 3 s). A missing program skips the test (fails under
`PROXYGATE_REQUIRE_ALL=1`) through `tests.conftest.skip_or_fail`.

tinyproxy gets a generated config: see `tinyproxy_config`. With no `ConnectPort` line it lets
CONNECT reach any port (the Debian default file is what limits it, not the program).

What these real proxies do that the fakes do not (checked in tests/test_support_rig.py):

- Neither relays a half-close: on the client's EOF they close the tunnel both ways.
- tinyproxy 1.11 answers missing credentials with 407 but wrong ones with 401, and a refused
  target with "500 Unable to connect" (not 502). microsocks replies 0x05 to a refused target.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from loadtest.procs import wait_listening
from tests.conftest import skip_or_fail
from tests.support.net import free_port, is_loopback

#: How long a proxy may take to accept connections after it was started.
START_TIMEOUT = 5.0
#: How long a proxy may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 3.0

_PACKAGES = {"microsocks": "microsocks", "tinyproxy": "tinyproxy"}


class ProxyStartError(RuntimeError):
    """A Debian proxy did not come up; the message carries its output."""


def require_program(name: str) -> str:
    """The path of program `name`, or skip (fail under PROXYGATE_REQUIRE_ALL) when missing."""
    path = shutil.which(name)
    if path is None:
        package = _PACKAGES.get(name, name)
        skip_or_fail(f"{name} is not installed (apt-get install {package})")
        raise AssertionError("unreachable")  # skip_or_fail raises
    return path


@dataclass
class RunningProxy:
    """A started Debian proxy."""

    name: str
    scheme: str  # "socks5" or "http"
    host: str
    port: int
    egress: str
    auth: tuple[str, str] | None
    process: subprocess.Popen[bytes]
    output_path: Path  # the program's stdout and stderr
    log_path: Path | None = None  # its own log file, when it has one

    @property
    def url(self) -> str:
        """e.g. "socks5://127.0.0.1:PORT"; credentials included when `auth` is set."""
        userinfo = ""
        if self.auth is not None:
            userinfo = f"{quote(self.auth[0], safe='')}:{quote(self.auth[1], safe='')}@"
        return f"{self.scheme}://{userinfo}{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """What the program printed, followed by its log file if it has one."""
        text = _read(self.output_path)
        if self.log_path is not None:
            text += _read(self.log_path)
        return text


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def run_microsocks(
    *,
    egress: str = "127.0.0.1",
    auth: tuple[str, str] | None = None,
    host: str = "127.0.0.1",
    workdir: Path | None = None,
) -> AsyncIterator[RunningProxy]:
    """Run `microsocks -i HOST -p PORT -b EGRESS [-u USER -P PASS]`."""
    program = require_program("microsocks")

    def argv(port: int, _: Path) -> list[str]:
        command = [program, "-i", host, "-p", str(port), "-b", egress]
        if auth is not None:
            command += ["-u", auth[0], "-P", auth[1]]
        return command

    async with _running("microsocks", "socks5", argv, host, egress, auth, workdir) as proxy:
        yield proxy


def tinyproxy_config(
    *, port: int, host: str, egress: str, auth: tuple[str, str] | None, workdir: Path
) -> str:
    """The config tinyproxy runs with: loopback only, no Via header, CONNECT to any port."""
    lines = [
        f"Port {port}",
        f"Listen {host}",
        f"Bind {egress}",
        "Timeout 60",
        "MaxClients 64",
        "Allow 127.0.0.0/8",
        "Allow ::1",
        "DisableViaHeader Yes",
        # No ConnectPort line: CONNECT may reach every port.
        f'LogFile "{workdir / "tinyproxy.log"}"',
        "LogLevel Info",
        f'PidFile "{workdir / "tinyproxy.pid"}"',
    ]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def run_tinyproxy(
    *,
    egress: str = "127.0.0.1",
    auth: tuple[str, str] | None = None,
    host: str = "127.0.0.1",
    workdir: Path | None = None,
) -> AsyncIterator[RunningProxy]:
    """Run `tinyproxy -d -c CONFIG` with `tinyproxy_config`; its log is `proxy.log_path`."""
    program = require_program("tinyproxy")
    if auth is not None and any(" " in part or not part for part in auth):
        raise ValueError("tinyproxy BasicAuth takes non-empty credentials without spaces")

    def argv(port: int, directory: Path) -> list[str]:
        config = directory / "tinyproxy.conf"
        config.write_text(
            tinyproxy_config(port=port, host=host, egress=egress, auth=auth, workdir=directory)
        )
        return [program, "-d", "-c", str(config)]

    async with _running("tinyproxy", "http", argv, host, egress, auth, workdir) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def _running(
    name: str,
    scheme: str,
    argv: Callable[[int, Path], list[str]],
    host: str,
    egress: str,
    auth: tuple[str, str] | None,
    workdir: Path | None,
) -> AsyncIterator[RunningProxy]:
    if not (is_loopback(host) and is_loopback(egress)):
        raise ValueError(f"{name} must listen on and dial from loopback addresses")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=name + "-")))
        proxy = await _start(name, scheme, argv, host, egress, auth, workdir)
        try:
            yield proxy
        finally:
            await stop_process(proxy.process)


async def _start(
    name: str,
    scheme: str,
    argv: Callable[[int, Path], list[str]],
    host: str,
    egress: str,
    auth: tuple[str, str] | None,
    workdir: Path,
) -> RunningProxy:
    """Start on a free port; retry twice if another process took the port meanwhile."""
    failure = ""
    for attempt in range(3):
        directory = workdir / f"{name}-{attempt}"
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port(host)
        output_path = directory / "output.txt"
        command = argv(port, directory)
        process = _spawn(command, output_path)
        proxy = RunningProxy(name, scheme, host, port, egress, auth, process, output_path)
        if name == "tinyproxy":
            proxy.log_path = directory / "tinyproxy.log"
        if await wait_listening(process, host, port, START_TIMEOUT):
            return proxy
        await stop_process(process)
        failure = proxy.output()
        if "in use" not in failure:
            break
    raise ProxyStartError(
        f"{name} did not accept connections on {host} within {START_TIMEOUT} s "
        f"(exit status {process.returncode}); its output:\n{failure}"
    )


def _spawn(command: list[str], output_path: Path) -> subprocess.Popen[bytes]:
    """Start `command` in its own session, its stdout and stderr going to `output_path`."""
    with output_path.open("wb") as output:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate `process` (by its pid), kill it after `STOP_TIMEOUT`, and reap it."""
    if process.poll() is None:
        process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        # Polling is fine here: a child process gives the event loop nothing to wait on.
        while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if process.poll() is None:
            process.kill()
    process.wait()
