"""`proxygate run` as a real process (tree, with `--workers N`) for tests that need one:

    async with run_gateway(tmp_path, lambda port, admin_port: toml, workers=2) as gateway:
        pids = await gateway.serving()
        ...

The configuration is written from the ports picked for it; the gateway's stderr goes to a log
file the test reads. On the way out, whatever it started that still runs is killed, by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import free_port

__all__ = ["WITHIN", "GatewayProcess", "alive", "all_gone", "run_gateway"]

REPO = Path(__file__).resolve().parents[2]
#: Bound on every wait for the process tree (start-up is a few Python interpreters).
WITHIN = 30.0


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    log: Path
    port: int
    admin_port: int

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def serving(self) -> list[int]:
        """The workers' pids, once the parent says they all serve (`--workers` 2 or more)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WITHIN
        while True:
            found = re.search(r"workers serving \(pids ([\d ]+)\)", self.text())
            if found:
                return [int(pid) for pid in found.group(1).split()]
            if self.process.returncode is not None or loop.time() > deadline:
                pytest.fail(f"the workers did not start:\n{self.text()}")
            await asyncio.sleep(0.05)

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.process.wait(), WITHIN)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by whoever inherited it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def all_gone(pids: list[int], within: float = WITHIN) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while any(alive(pid) for pid in pids):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@contextlib.asynccontextmanager
async def run_gateway(
    tmp_path: Path, config: Callable[[int, int], str], *, workers: int = 1
) -> AsyncIterator[GatewayProcess]:
    """`proxygate run --workers N` with the TOML `config(port, admin_port)` makes."""
    port, admin_port = free_port(), free_port()
    path = tmp_path / "gateway.toml"
    path.write_text(config(port, admin_port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGATE_")}
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONFAULTHANDLER"] = "1"  # a crash prints where it happened
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "run", "--config", str(path)),
            *("--workers", str(workers), "--log-level", "info"),
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=sink,
        )
    running = GatewayProcess(process, log, port, admin_port)
    try:
        yield running
    finally:
        pids = [int(p) for p in re.findall(r"ready \(pid (\d+)\)", running.text())]
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in pids:  # only pids this test's process started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
