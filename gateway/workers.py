"""`proxygate run --workers N`: N gateway processes serving the same ports.

The parent (`supervise`) starts N copies of its own command line, each told its place by a
hidden `--worker-of` flag. Each worker listens with SO_REUSEPORT, so the kernel spreads new
connections across them, and all of them share the SQL storage (leases, limits, sessions,
round robin, health). `memory://` is refused: each worker would have pools of its own. Only
worker 0 serves the admin API and runs the active checks: several processes on one admin port
would each answer for themselves, and N checkers would probe every upstream N times.

Worker 0 starts first (so a configuration or database problem is reported once, and the
catalog is loaded by one process), then the others together; each reports ready over a pipe
once it listens. A worker that exits before it is ready, or at any time after, stops the others
and the parent exits 1 (a process manager then restarts the whole). SIGTERM or SIGINT to the
parent is passed on to every worker, which drain as a single gateway does; the parent exits 0
when they all did. Workers also hold the read end of a pipe the parent never writes: if the
parent dies without a word (SIGKILL), the pipe ends, and they drain and exit too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from config import Settings

__all__ = ["WorkerRole", "supervise", "workers_refusal"]

log = logging.getLogger("proxygate.workers")

#: Seconds a worker may take beyond its drain timeout before it is killed.
STOP_GRACE = 10.0


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """A worker's place: its index and the pipes it shares with the parent."""

    index: int
    ready_fd: int
    lifeline_fd: int

    @classmethod
    def parse(cls, text: str) -> WorkerRole:
        """`INDEX:READY_FD:LIFELINE_FD`, as `str()` writes it."""
        index, ready_fd, lifeline_fd = (int(part) for part in text.split(":"))
        return cls(index, ready_fd, lifeline_fd)

    def __str__(self) -> str:
        return f"{self.index}:{self.ready_fd}:{self.lifeline_fd}"

    @property
    def serves_admin(self) -> bool:
        """Worker 0 alone serves the admin API and runs the active checks."""
        return self.index == 0

    def settings_for(self, settings: Settings) -> Settings:
        if self.serves_admin:
            return settings
        return replace(settings, checks=replace(settings.checks, enabled=False))

    def report_ready(self) -> None:
        os.write(self.ready_fd, b"ready\n")
        os.close(self.ready_fd)

    async def watch_parent(self, parent_gone: Callable[[], None]) -> None:
        """Call `parent_gone` when the parent's end of the lifeline closes."""
        reader = await _pipe_reader(self.lifeline_fd)
        await reader.read()  # the parent never writes: this returns at end of file only
        parent_gone()


def workers_refusal(settings: Settings, count: int) -> str | None:
    """Why `count` workers cannot serve `settings`, or None when they can."""
    if count <= 1:
        return None
    if settings.storage.scheme == "memory":
        return (
            f"--workers {count} needs shared storage (storage.url sqlite:///... or "
            "postgresql://...): with memory:// each worker would keep pools and leases of its "
            "own, so max_concurrency, sessions and round robin would not hold across them"
        )
    for listener in settings.all_listeners():
        if listener.listen.port == 0:
            return (
                f"--workers {count} cannot share listen port 0 ({listener.listen.host}:0): "
                "each worker would get a port of its own; give a port"
            )
    return None


class _Worker:
    __slots__ = ("index", "process", "ready")

    def __init__(
        self, index: int, process: asyncio.subprocess.Process, ready: asyncio.StreamReader
    ) -> None:
        self.index = index
        self.process = process
        self.ready = ready


async def supervise(argv: Sequence[str], count: int, *, drain_timeout: float) -> int:
    """Run `count` workers of the command line `argv` until a signal or a worker's exit."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def request_stop(signame: str) -> None:
        if not stopping.is_set():
            log.info("%s received: stopping %d workers", signame, count)
            stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    lifeline_read, lifeline_write = os.pipe()
    workers: list[_Worker] = []
    clean = False
    try:
        workers.append(await _spawn(argv, 0, lifeline_read))
        if await _until_ready(workers, stopping):
            rest = [await _spawn(argv, index, lifeline_read) for index in range(1, count)]
            workers += rest
            if await _until_ready(rest, stopping):
                log.info(
                    "%d workers serving (pids %s)",
                    count,
                    " ".join(str(w.process.pid) for w in workers),
                )
                clean = await _until_stop_or_exit(workers, stopping)
    finally:
        os.close(lifeline_read)
        exits_clean = await _stop_all(workers, drain_timeout + STOP_GRACE)
        os.close(lifeline_write)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if not (clean and exits_clean):
        return 1
    log.info("stopped")
    return 0


async def _spawn(argv: Sequence[str], index: int, lifeline: int) -> _Worker:
    ready_read, ready_write = os.pipe()
    try:
        role = WorkerRole(index, ready_write, lifeline)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *argv,
            "--worker-of",
            str(role),
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(ready_write, lifeline),
        )
    except BaseException:
        os.close(ready_read)
        raise
    finally:
        os.close(ready_write)  # the worker holds it now: end of file when it exits
    return _Worker(index, process, await _pipe_reader(ready_read))


async def _until_ready(workers: list[_Worker], stopping: asyncio.Event) -> bool:
    """True once every worker reported ready; False when one exited first or a stop came."""
    waits: dict[asyncio.Task[Any], _Worker] = {
        asyncio.create_task(w.ready.readline(), name=f"worker-{w.index}-ready"): w for w in workers
    }
    stop = asyncio.create_task(stopping.wait(), name="workers-stop")
    try:
        pending: set[asyncio.Task[Any]] = set(waits)
        while pending:
            done, pending = await asyncio.wait(
                pending | {stop}, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(stop)
            if stop in done:
                return False
            for task in done:
                worker = waits[task]
                if task.result() != b"ready\n":
                    code = await worker.process.wait()
                    log.error("worker %d exited with %d before it was ready", worker.index, code)
                    return False
                log.info("worker %d ready (pid %d)", worker.index, worker.process.pid)
        return True
    finally:
        for task in (*waits, stop):
            task.cancel()
        await asyncio.gather(*waits, stop, return_exceptions=True)


async def _until_stop_or_exit(workers: list[_Worker], stopping: asyncio.Event) -> bool:
    """True when a stop was asked for; False when a worker exited first."""
    exits: dict[asyncio.Task[Any], _Worker] = {
        asyncio.create_task(w.process.wait(), name=f"worker-{w.index}-exit"): w for w in workers
    }
    stop = asyncio.create_task(stopping.wait(), name="workers-stop")
    try:
        done, _ = await asyncio.wait({*exits, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*exits, stop):
            task.cancel()
        await asyncio.gather(*exits, stop, return_exceptions=True)
    if stop in done:
        return True
    for task in done:
        worker = exits[task]
        log.error("worker %d exited with %s: stopping the others", worker.index, task.result())
    return False


async def _stop_all(workers: list[_Worker], timeout: float) -> bool:
    """SIGTERM every worker still running and wait for all; kill those still there after
    `timeout` seconds. True when every worker exited 0."""
    for worker in workers:
        if worker.process.returncode is None:
            worker.process.send_signal(signal.SIGTERM)
    waiting = [worker.process.wait() for worker in workers]
    try:
        codes = await asyncio.wait_for(asyncio.gather(*waiting), timeout)
    except TimeoutError:
        for worker in workers:
            if worker.process.returncode is None:
                log.error("worker %d did not stop in %gs: killed", worker.index, timeout)
                worker.process.kill()
        codes = [await worker.process.wait() for worker in workers]
    return all(code == 0 for code in codes)


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader
