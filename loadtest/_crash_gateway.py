"""The crash hunt's gateway process: its configuration, start, readings and stop.

`proxygate run --workers N` runs as a child of the hunt with PYTHONFAULTHANDLER=1, in its own
session, its output in a file; it is read from outside only (/proc, the admin API, the log), so
the gateway under test is exactly the one installed for `--gateway-python`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import procs

__all__ = [
    "BAD_LOG_MARKERS",
    "GatewayProcess",
    "Upstreams",
    "gateway_config",
    "log_problems",
    "signal_deaths",
]

#: Lines that must never appear in the gateway's output. The first three are Python's own
#: words for an error nobody handled; "Fatal Python error" is faulthandler's on a crash.
BAD_LOG_MARKERS = (
    "Traceback",
    "Exception in callback",
    "Task exception was never retrieved",
    "Task was destroyed but it is pending",
    "Fatal Python error",
)
#: The supervisor's line for a worker that ended (`gateway.workers`); a negative code is a signal.
_WORKER_EXIT = re.compile(r"worker (\d+) exited with (-?\d+)")
#: Timeouts short enough that every fault the hunt injects resolves within a second or two.
GATEWAY_TIMEOUTS = {
    "acquire_timeout": 1.0,
    "connect_timeout": 1.0,
    "response_timeout": 1.5,
    "header_timeout": 2.0,
    "idle_timeout": 5.0,
    "drain_timeout": 1.0,
    "keepalive_idle_timeout": 1.0,
}
#: Bound on start-up: a few interpreters, a catalog, and for PostgreSQL a first connection.
START_TIMEOUT = 45.0


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Proxy URLs per pool."""

    mixed: tuple[str, ...]
    narrow: tuple[str, ...]
    dialing: tuple[str, ...]


def _toml_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def gateway_config(
    ports: tuple[int, int, int], admin_port: int, storage_url: str, upstreams: Upstreams
) -> str:
    """The hunt's gateway: three listeners (one per pool), short timeouts, fast ejection."""
    timeouts = "".join(f"{name} = {value}\n" for name, value in GATEWAY_TIMEOUTS.items())
    # Ejected after 3 failures in a row, back after 1-3 s: ejection and re-admission happen
    # over and over, and no faulty upstream leaves rotation for long.
    health = "failures_to_eject = 3\nbase_ejection_s = 1.0\nmax_ejection_s = 3.0\n"
    return (
        f'[gateway]\nlisten = ["127.0.0.1:{ports[0]}"]\ndefault_pool = "mixed"\n{timeouts}'
        'log_level = "info"\n'
        f"[storage]\nurl = {json.dumps(storage_url)}\n"
        "[checks]\nenabled = false\n"
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        f'[[pools]]\nname = "mixed"\nselector = "round_robin"\nretries = 2\n{health}'
        f"proxies = {_toml_list(upstreams.mixed)}\n"
        f'[[pools]]\nname = "narrow"\nretries = 1\nmax_concurrency = 1\n{health}'
        f"proxies = {_toml_list(upstreams.narrow)}\n"
        f'[[pools]]\nname = "dialing"\nretries = 1\n{health}'
        f"proxies = {_toml_list(upstreams.dialing)}\n"
        f'[[listeners]]\nlisten = "127.0.0.1:{ports[1]}"\npool = "narrow"\n'
        f'[[listeners]]\nlisten = "127.0.0.1:{ports[2]}"\npool = "dialing"\n'
    )


def child_env() -> dict[str, str]:
    """The hunt's environment for the gateway: faulthandler on, nothing of ours leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGATE_")}
    for name in ("PYTHONPATH", "PYTHONWARNINGS", "PYTHONHOME"):
        env.pop(name, None)
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def spawn(command: list[str], output: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start `command` in its own session in `cwd`, stdout and stderr to `output`."""
    with output.open("wb") as sink:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env(),
            cwd=cwd,
        )


async def run_command(
    python: str, args: list[str], cwd: Path, log: Path, timeout: float = 60.0
) -> tuple[int, str]:
    """Run `python -m gateway ARGS` to completion (e.g. `db upgrade`); exit code and output."""
    process = spawn([python, "-m", "gateway", *args], log, cwd)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    code = await procs.stop(process, grace=2.0)
    return code, procs.tail(log, 20)


@dataclass
class GatewayProcess:
    """A running `proxygate run --workers N`, and what is known of it."""

    python: str
    config: Path
    workers: int
    log: Path
    admin_port: int
    ports: tuple[int, int, int]
    process: subprocess.Popen[bytes] | None = None
    #: Every worker pid seen, to stop only those (and only if still ours) on the way out.
    worker_pids: list[int] = field(default_factory=list)

    async def start(self, cwd: Path) -> str | None:
        """Start and wait until every listener accepts; None, or why it did not come up."""
        # The working directory is not the repository: `python -m gateway` must import the
        # gateway installed for `python`, not a source tree that happens to be the cwd.
        command = [self.python, "-m", "gateway", "run", "--config", str(self.config)]
        command += ["--workers", str(self.workers), "--log-level", "info"]
        self.process = spawn(command, self.log, cwd)
        deadline = time.monotonic() + START_TIMEOUT
        for port in (*self.ports, self.admin_port):
            left = max(0.1, deadline - time.monotonic())
            if not await procs.wait_listening(self.process, "127.0.0.1", port, left):
                return f"port {port} did not accept connections: {procs.tail(self.log)}"
        while self.workers > 1 and "workers serving" not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                return f"the workers did not all start: {procs.tail(self.log)}"
            await asyncio.sleep(0.05)
        self.note_workers()
        return None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def note_workers(self) -> list[int]:
        """The parent's children now (the workers; none with one worker)."""
        found = _children(self.pid)
        self.worker_pids += [pid for pid in found if pid not in self.worker_pids]
        return found

    def processes(self) -> dict[str, int]:
        """Name to pid of every gateway process: `parent` (or `gateway`), `worker-N`."""
        if self.workers == 1:
            return {"gateway": self.pid}
        named = {"parent": self.pid}
        for pid in self.note_workers():
            index = _worker_index(pid)
            named[f"worker-{index if index is not None else pid}"] = pid
        return named

    async def stats(self) -> dict[str, object] | None:
        """GET /api/stats (worker 0 serves it); None when it did not answer 200."""
        try:
            async with asyncio.timeout(3.0):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.admin_port)
                try:
                    writer.write(b"GET /api/stats HTTP/1.0\r\nHost: admin\r\n\r\n")
                    raw = await reader.read()
                finally:
                    writer.transport.abort()
        except (OSError, TimeoutError):
            return None
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            return None
        answer: dict[str, object] = json.loads(body)
        return answer

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM the parent, wait `timeout` for its exit; its status (None: it had to be killed).

        Workers are then waited for (they end when the parent does); any still running after a
        grace period is killed, by the pid recorded while it was the parent's child and only if
        it still runs this gateway's command line."""
        if self.process is None:
            return None
        code: int | None = None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
        else:
            code = self.process.returncode
        self.process.wait()
        await self._reap_workers()
        return code

    async def _reap_workers(self) -> None:
        deadline = time.monotonic() + 10.0
        while any(_ours(pid, self.config) for pid in self.worker_pids):
            if time.monotonic() > deadline:
                for pid in self.worker_pids:
                    if _ours(pid, self.config):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                break
            await asyncio.sleep(0.05)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found += [int(child) for child in text.split()]
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _worker_index(pid: int) -> int | None:
    line = _cmdline(pid)
    if "--worker-of" in line:
        where = line.index("--worker-of") + 1
        if where < len(line):
            return int(line[where].split(":")[0])
    return None


def _ours(pid: int, config: Path) -> bool:
    """Whether `pid` still runs a gateway on `config` and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and str(config) in _cmdline(pid)


def log_problems(text: str) -> list[str]:
    """Per marker of `BAD_LOG_MARKERS` found: how often, and its first line with what follows
    (a traceback, or faulthandler's dump of the stack)."""
    lines = text.splitlines()
    found: list[str] = []
    for marker in BAD_LOG_MARKERS:
        where = [number for number, line in enumerate(lines) if marker in line]
        if where:
            first = "\n    ".join(lines[where[0] : where[0] + 12])
            found.append(f"{len(where)} x {marker!r}; the first:\n    {first}")
    return found


def signal_deaths(text: str, code: int | None) -> list[str]:
    """Every gateway process that died of a signal, by the parent's status and its log."""
    deaths = [
        f"worker {index} killed by signal {-int(status)}"
        for index, status in _WORKER_EXIT.findall(text)
        if int(status) < 0
    ]
    if code is not None and code < 0:
        deaths.append(f"the gateway (parent) killed by signal {-code}")
    if "Fatal Python error" in text and not deaths:
        deaths.append("Fatal Python error in the output")
    return deaths


def socket_inodes_to(port: int) -> set[str]:
    """Inodes of TCP sockets connected to `port` on this host (a database's connections)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def open_fds(pid: int, db_port: int | None) -> tuple[int, int]:
    """Open fds of `pid`: (all but database connections, database connections)."""
    db = socket_inodes_to(db_port) if db_port else set()
    other = to_db = 0
    with contextlib.suppress(OSError):
        for entry in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{entry}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in db:
                to_db += 1
            else:
                other += 1
    return other, to_db
