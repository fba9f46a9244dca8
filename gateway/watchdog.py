"""The stop watchdog: a process that has not finished some seconds after it was asked to stop
exits anyway, status 1, logging the tasks that held it (see `gateway.cli`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any, NoReturn

__all__ = ["StopWatchdog", "describe_tasks"]

log = logging.getLogger("proxygate")

#: Seconds the watchdog gives its last log lines before it exits without them.
_LOG_FLUSH_TIMEOUT = 1.0
#: Kinds of task a log line names (the rest are counted), and awaits shown for each.
_TASKS_SHOWN = 20
_AWAITS_SHOWN = 8


class StopWatchdog:
    """Ends the process, status 1, when it has not finished `timeout` seconds after a stop was
    asked for, logging the tasks that held it.

    A thread of its own keeps the time, so it fires whatever the event loop does: a task that
    swallows every CancelledError keeps `asyncio.Runner.close` waiting for it forever, a task
    that blocks keeps the loop from running at all. Leaving the `with` block disarms it: the
    process finished in time.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._timer: threading.Timer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> StopWatchdog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def arm(self, why: str) -> None:
        """Start counting, from inside the event loop (once: later calls keep the deadline)."""
        if self._timer is not None:
            return
        self._loop = asyncio.get_running_loop()
        reason = f"not finished {self.timeout:g}s after {why}"
        self._timer = threading.Timer(self.timeout, self.fire, (reason,))
        self._timer.daemon = True
        self._timer.start()

    def fire(self, reason: str) -> NoReturn:
        """Log what still runs and exit now, status 1, from any thread."""
        # Should the log itself block (stderr a full pipe nobody reads), exit all the same.
        last_resort = threading.Timer(_LOG_FLUSH_TIMEOUT, os._exit, (1,))
        last_resort.daemon = True
        last_resort.start()
        try:
            held = describe_tasks(_running_tasks(self._loop)) or "no task"
        except Exception as exc:  # frames read while the loop's thread runs them: best effort
            held = f"tasks that could not be told ({exc!r})"
        log.error("%s: exiting now, held by %s", reason, held)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(1)


def _running_tasks(loop: asyncio.AbstractEventLoop | None) -> list[asyncio.Task[Any]]:
    """The tasks of `loop` not done yet: asyncio.all_tasks, safe from another thread too."""
    if loop is None:
        return []
    try:
        return list(asyncio.all_tasks(loop))
    except RuntimeError:  # the task registry kept changing under a foreign thread's reading
        return []


def describe_tasks(tasks: Iterable[asyncio.Task[Any]]) -> str:
    """`tasks` by name and where each waits, alike ones counted once: "stubborn (_stubborn line
    15 > sleep line 649)", "client-connection (serve line 80 > ...) x 250"."""
    counts = Counter(_describe_task(task) for task in tasks)
    shown = [f"{text} x {n}" if n > 1 else text for text, n in counts.most_common(_TASKS_SHOWN)]
    if len(counts) > _TASKS_SHOWN:
        shown.append(f"{len(counts) - _TASKS_SHOWN} more kinds")
    return ", ".join(shown)


def _describe_task(task: asyncio.Task[Any]) -> str:
    """A task's name and its chain of awaits, outermost first, each with the line it waits on
    (a compiled coroutine shows its type alone: it keeps no frames)."""
    chain: list[str] = []
    awaited: object = task.get_coro()
    while awaited is not None and len(chain) < _AWAITS_SHOWN:
        frame = getattr(awaited, "cr_frame", None)
        if frame is None:  # a future, or a compiled coroutine: show the latter's type
            if not chain:
                chain.append(type(awaited).__qualname__)
            break
        chain.append(f"{frame.f_code.co_qualname} line {frame.f_lineno}")
        awaited = getattr(awaited, "cr_await", None)
    return f"{task.get_name()} ({' > '.join(chain)})"
