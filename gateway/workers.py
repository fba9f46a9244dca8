"""`proxygate run --workers N`: N gateway processes serving the same ports.

The parent (`supervise`) starts N copies of its own command line, each told its place by a
hidden `--worker-of` flag. Each worker listens with SO_REUSEPORT, so the kernel spreads new
connections across them, and all of them share the SQL storage (leases, limits, sessions,
round robin, health). `memory://` is refused: each worker would have pools of its own. Only
worker 0 serves the admin API and runs the active checks: several processes on one admin port
would each answer for themselves, and N checkers would probe every upstream N times.

Worker 0 starts first (so a configuration or database problem is reported once, and the
catalog is loaded by one process), then the others together; each reports ready over a pipe
once it listens. A worker that exits before it is ready, or at any time after (a crash, a
signal), stops the others: SIGTERM, SIGKILL for those still there `STOP_GRACE` seconds past the
drain timeout, every one reaped. The parent then exits 1 (a process manager restarts the
whole), or 2 when a worker could not start for a reason it told in one line itself (a port in
use: the same status as a single gateway's).

SIGTERM or SIGINT to the parent is passed on to every worker, which drain as a single gateway
does; the parent exits 0 when they all did. A second signal kills the workers at once: whoever
sent it is not waiting for the drain. Workers die with the parent however it dies: the kernel
sends them SIGTERM when it exits (PR_SET_PDEATHSIG, SIGKILL included), and they hold the read
end of a pipe the parent never writes, which ends with it. Either way they drain and exit, within
the bound their own watchdog sets (`gateway.watchdog.StopWatchdog`); the parent has one too, for a
stop that would outlast even the SIGKILLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from config import Settings

__all__ = ["EXIT_GRACE", "STOP_GRACE", "WorkerRole", "supervise", "workers_refusal"]

log = logging.getLogger("proxygate.workers")

#: Seconds a stopping process may take beyond its drain timeout (closing the storage, the event
#: loop's own shutdown) before its watchdog ends it.
EXIT_GRACE = 5.0
#: Seconds a worker may take beyond its drain timeout before the parent kills it: past the
#: worker's own watchdog, so that a stuck worker still gets to say what held it.
STOP_GRACE = EXIT_GRACE + 2.0
#: prctl(2)'s option that asks for a signal when the parent exits (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """A worker's place: its index, the pipes it shares with the parent, the parent's pid."""

    index: int
    ready_fd: int
    lifeline_fd: int
    parent: int

    @classmethod
    def parse(cls, text: str) -> WorkerRole:
        """`INDEX:READY_FD:LIFELINE_FD:PARENT_PID`, as `str()` writes it."""
        index, ready_fd, lifeline_fd, parent = (int(part) for part in text.split(":"))
        return cls(index, ready_fd, lifeline_fd, parent)

    def __str__(self) -> str:
        return f"{self.index}:{self.ready_fd}:{self.lifeline_fd}:{self.parent}"

    def die_with_parent(self) -> bool:
        """Have the kernel send this process SIGTERM when the parent exits, however it exits.

        The lifeline tells the same, but only to a running event loop: this also ends a worker
        still starting (SIGTERM's default action, before the gateway handles it). False when
        the parent is gone already, having died before the request was made.

        (The kernel watches the parent's thread that started this process: its event loop's,
        the main thread, which lasts as long as the parent.)
        """
        if sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                reason = os.strerror(ctypes.get_errno())
                log.warning("worker %d cannot ask to die with its parent: %s", self.index, reason)
        return self.parent_alive()

    def parent_alive(self) -> bool:
        """Whether the parent still runs (an orphan belongs to another process by now)."""
        return os.getppid() == self.parent

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


async def supervise(
    argv: Sequence[str], count: int, *, drain_timeout: float, on_stop: Callable[[str], None]
) -> int:
    """Run `count` workers of the command line `argv` until a signal or a worker's exit, and
    return the exit status (see the module's docstring). `on_stop(why)` is called once the
    workers are being stopped, from a signal or not: the caller's watchdog starts counting."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    workers: list[_Worker] = []

    def request_stop(signame: str) -> None:
        if stopping.is_set():
            log.warning("%s received again: killing the workers", signame)
            _kill_all(workers)
            return
        log.info("%s received: stopping %d workers", signame, count)
        on_stop(signame)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    lifeline_read, lifeline_write = os.pipe()
    status = 1
    try:
        status = await _run_workers(argv, count, workers, lifeline_read, stopping)
    finally:
        on_stop("the workers' stop")
        os.close(lifeline_read)
        exits_clean = await _stop_all(workers, drain_timeout + STOP_GRACE)
        os.close(lifeline_write)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if status == 0 and not exits_clean:
        return 1
    if status == 0:
        log.info("stopped")
    return status


async def _run_workers(
    argv: Sequence[str], count: int, workers: list[_Worker], lifeline: int, stopping: asyncio.Event
) -> int:
    """Start worker 0, then the others, into `workers`; run them until a stop is asked for (0)
    or one exits (the parent's exit status then)."""
    workers.append(await _spawn(argv, 0, lifeline))
    if (status := await _until_ready(workers, stopping)) is not None:
        return status
    rest = [await _spawn(argv, index, lifeline) for index in range(1, count)]
    workers += rest
    if (status := await _until_ready(rest, stopping)) is not None:
        return status
    pids = " ".join(str(w.process.pid) for w in workers)
    log.info("%d workers serving (pids %s)", count, pids)
    return await _until_stop_or_exit(workers, stopping)


async def _spawn(argv: Sequence[str], index: int, lifeline: int) -> _Worker:
    ready_read, ready_write = os.pipe()
    try:
        role = WorkerRole(index, ready_write, lifeline, os.getpid())
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


async def _until_ready(workers: list[_Worker], stopping: asyncio.Event) -> int | None:
    """None once every worker reported ready; the parent's exit status when one exited first
    (2 when it exited 2: it could not start, and said why in one line) or a stop came (1)."""
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
                return 1
            for task in done:
                worker = waits[task]
                if task.result() != b"ready\n":
                    return _not_started(worker, await worker.process.wait())
                log.info("worker %d ready (pid %d)", worker.index, worker.process.pid)
        return None
    finally:
        for task in (*waits, stop):
            task.cancel()
        await asyncio.gather(*waits, stop, return_exceptions=True)


def _not_started(worker: _Worker, code: int) -> int:
    """The parent's exit status for a worker that ended with `code` before it was ready."""
    if code == 2:
        # A bad port or configuration, which the worker told in one line: that line is all the
        # user needs to read, and the status is a single gateway's.
        log.debug("worker %d exited with 2 before it was ready", worker.index)
        return 2
    log.error("worker %d %s before it was ready", worker.index, _how_it_ended(code))
    return 1


async def _until_stop_or_exit(workers: list[_Worker], stopping: asyncio.Event) -> int:
    """0 when a stop was asked for; 1 when a worker exited first."""
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
        return 0
    for task in done:
        worker = exits[task]
        how = _how_it_ended(task.result())
        log.error("worker %d %s: stopping the others", worker.index, how)
    return 1


def _how_it_ended(code: int) -> str:
    """A process's end from its exit status: "exited with 3", "exited with -11 (died of
    SIGSEGV)" (the status kept as it was: tools read "worker N exited with -S")."""
    if code >= 0:
        return f"exited with {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"exited with {code} (died of {name})"


async def _stop_all(workers: list[_Worker], timeout: float) -> bool:
    """SIGTERM every worker still running and wait for all; SIGKILL those still there after
    `timeout` seconds. Every worker is reaped on return. True when every worker exited 0."""
    for worker in workers:
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                worker.process.send_signal(signal.SIGTERM)
    waiting = [worker.process.wait() for worker in workers]
    try:
        codes = await asyncio.wait_for(asyncio.gather(*waiting), timeout)
    except TimeoutError:
        for worker in workers:
            if worker.process.returncode is None:
                log.error("worker %d did not stop in %gs: killed", worker.index, timeout)
        _kill_all(workers)
        codes = [await worker.process.wait() for worker in workers]
    return all(code == 0 for code in codes)


def _kill_all(workers: list[_Worker]) -> None:
    """SIGKILL every worker still running (`_stop_all` reaps them)."""
    for worker in workers:
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                worker.process.kill()


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader
