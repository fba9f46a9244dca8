"""`python -m loadtest.taskprobe FILE ARGS...`: proxygate (`python -m gateway ARGS...`) that also
writes how many asyncio tasks it runs to FILE, twice a second.

The gateway does not publish its task count, and the memory target wants tasks flat over a soak
(and tasks per idle tunnel tell where a tunnel's memory goes). The gateway's runner keeps its
event loop to itself (and `proxygate run` freezes start-up's objects out of the garbage
collector's sight), so this process hands `uvloop.run` a loop factory that also notes the loop
it makes: the same loop the gateway would get. A thread then asks the loop itself, with
`call_soon_threadsafe`, to count `asyncio.all_tasks()`: nothing of asyncio is read from the
wrong thread. What it costs the gateway: one callback every half second, and one thread that
mostly sleeps. Without uvloop nothing is counted.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main", "read_count"]

PERIOD = 0.5


def read_count(path: Path) -> int | None:
    """The last count written to `path`, or None when there is none yet."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _noting_loops(made: list[asyncio.AbstractEventLoop]) -> bool:
    """Make `uvloop.run` (in this process only) note every loop it makes in `made`; False
    without uvloop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        return False
    run = uvloop.run

    def noting_run(main: Any, **options: Any) -> Any:
        factory: Callable[[], uvloop.Loop] = (
            options.pop("loop_factory", None) or uvloop.new_event_loop
        )

        def make() -> uvloop.Loop:
            loop = factory()
            made.append(loop)
            return loop

        return run(main, loop_factory=make, **options)

    uvloop.run = noting_run
    return True


def _count(loop: asyncio.AbstractEventLoop, into: list[int], done: threading.Event) -> None:
    into.append(len(asyncio.all_tasks(loop)))
    done.set()


def _watch(path: Path, made: list[asyncio.AbstractEventLoop]) -> None:
    while not made or not made[-1].is_running():
        time.sleep(PERIOD / 5)
    loop = made[-1]
    spare = path.with_name(path.name + ".new")
    while True:
        counted: list[int] = []
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(_count, loop, counted, done)
        except RuntimeError:  # the loop is closed: the gateway is on its way out
            return
        if done.wait(10.0):
            spare.write_text(f"{counted[0]}\n")
            os.replace(spare, path)  # readers never see a half-written number
        time.sleep(PERIOD)


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m loadtest.taskprobe FILE [proxygate arguments]", file=sys.stderr)
        return 2
    path = Path(sys.argv[1])
    from gateway.cli import main as proxygate

    made: list[asyncio.AbstractEventLoop] = []
    if _noting_loops(made):
        threading.Thread(target=_watch, args=(path, made), name="taskprobe", daemon=True).start()
    return proxygate(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
