"""`proxygate run` as a real process tree, for tests of how its processes start and end.

`proxygate_run` starts the command on a configuration file of the test's own, its stderr in a
file, and on the way out ends whatever is left of it: the parent, and every process whose
command line names that file (its workers), by pid, so nothing the test did not start is ever
touched. `hooks` puts a `sitecustomize` module on the processes' path: test-only behaviour (a
task that will not end, an event loop that blocks) loaded into every process of the tree, the
workers included, without anything of the kind in the product.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.storage.sql import upgrade
from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]
#: Bound on every wait for the process tree to start or say something (a few interpreters).
WITHIN = 30.0


@dataclass(frozen=True)
class Ports:
    """The ports of a test's gateway: `gateway.listen`, a `[[listeners]]` entry, the admin API."""

    proxy: int
    listener: int
    admin: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())

    def all(self) -> list[int]:
        return [self.proxy, self.listener, self.admin]


def gateway_toml(storage_url: str, ports: Ports, *, drain_timeout: float) -> str:
    """A gateway on `ports` over `storage_url`, with a direct pool and no active checks."""
    return (
        f'[gateway]\nlisten = ["127.0.0.1:{ports.proxy}"]\ndrain_timeout = {drain_timeout}\n'
        f'[admin]\nlisten = "127.0.0.1:{ports.admin}"\n[checks]\nenabled = false\n'
        f'[storage]\nurl = "{storage_url}"\n'
        '[[pools]]\nname = "default"\nproxies = ["direct://"]\n'
        f'[[listeners]]\nlisten = "127.0.0.1:{ports.listener}"\npool = "default"\n'
    )


async def sqlite_storage(tmp_path: Path) -> str:
    """The URL of a new SQLite storage, upgraded (several workers need shared storage)."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    await upgrade(url)
    return url


def gateway_env(**extra: str) -> dict[str, str]:
    """This environment without PROXYGATE_* settings or warnings-as-errors, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGATE_")}
    env.pop("PYTHONWARNINGS", None)
    env.update(extra)
    return env


def hooks(directory: Path, source: str) -> dict[str, str]:
    """Environment variables that load `source` as `sitecustomize` into every process started
    with them (`source` runs at interpreter start, before the gateway's code)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": str(directory)}


@dataclass
class RunningGateway:
    process: asyncio.subprocess.Process
    config: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def logged(self, pattern: str, within: float = WITHIN) -> re.Match[str]:
        """The first match of `pattern` in the log, once there."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not (found := re.search(pattern, self.text())):
            if loop.time() > deadline:
                pytest.fail(f"not logged within {within:g}s: {pattern!r}\n{self.text()}")
            await asyncio.sleep(0.05)
        return found

    async def workers_serving(self) -> list[int]:
        """The workers' pids, once the parent says they all serve."""
        found = await self.logged(r"workers serving \(pids ([\d ]+)\)")
        return [int(pid) for pid in found.group(1).split()]

    async def exit_code(self, within: float = WITHIN) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            pytest.fail(f"the gateway did not exit within {within:g}s:\n{self.text()}")

    def pids(self) -> list[int]:
        """Every live process of this gateway: the parent and the workers on its config file."""
        return processes_naming(str(self.config))


@contextlib.asynccontextmanager
async def proxygate_run(
    tmp_path: Path, toml: str, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[RunningGateway]:
    """`proxygate run --config FILE *args` with FILE holding `toml`."""
    config = tmp_path / "proxygate.toml"
    config.write_text(toml)
    log = tmp_path / "proxygate.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "run", "--config", str(config), *args),
            cwd=REPO,
            env=gateway_env() if env is None else env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=sink,
            preexec_fn=_no_core_files,
        )
    running = RunningGateway(process, config, log)
    try:
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in running.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _no_core_files() -> None:
    # A test kills workers with SIGSEGV: no core file from them, wherever the kernel puts it.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by whoever inherited it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


async def all_gone(pids: list[int], within: float) -> bool:
    """Whether every process of `pids` is gone within `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while any(alive(pid) for pid in pids):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener can take `port` again, as the gateway takes it (SO_REUSEADDR: only a
    socket still listening there stands in the way, not connections winding down)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            return False
    return True


@contextlib.contextmanager
def occupied_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port a plain listening socket of the test holds meanwhile."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        sock.listen()
        yield sock.getsockname()[1]
