"""What a process costs, read from /proc: CPU seconds, RSS, peak RSS, open fds, threads.

A process tree is counted whole (proxy.py runs its workers as child processes), so a peer that
forks is not flattered. Readings of a process that has gone away are zero, never an error.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ProcSample",
    "cpu_seconds",
    "descendants",
    "fd_limit",
    "sample",
    "set_affinity",
]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu: float  # user + system seconds of the whole tree
    rss: int  # bytes, the whole tree
    hwm: int  # peak RSS in bytes (VmHWM), summed over the tree
    fds: int
    threads: int


def _stat_fields(pid: int) -> list[str]:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return []
    # The command name may hold spaces and parentheses: the fields start after the last ")".
    return text[text.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it.

    Read from each thread's `children` list, a few small files: the harness samples its
    target twice a second from the load generator's own event loop, and scanning all of
    /proc instead stalled that loop for milliseconds, which showed up as the target's p99
    latency. Kernels without those lists (CONFIG_PROC_CHILDREN) get the scan."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        children = _children(current)
        if children is None:
            return _descendants_by_scan(pid)
        todo.extend(children)
    return found


def _children(pid: int) -> list[int] | None:
    """The children of `pid`; [] when it is gone, None when the kernel keeps no such list."""
    try:
        tasks = os.listdir(_PROC / str(pid) / "task")
    except OSError:
        return []
    children: list[int] = []
    for task in tasks:
        try:
            text = (_PROC / str(pid) / "task" / task / "children").read_text()
        except FileNotFoundError:
            if (_PROC / str(pid) / "task" / task).exists():
                return None
            continue  # the thread ended meanwhile
        except OSError:
            continue
        children.extend(int(child) for child in text.split())
    return children


def _descendants_by_scan(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return [pid]
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if len(fields) > 2:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def cpu_seconds(pid: int, *, tree: bool = True) -> float:
    return _cpu_seconds(descendants(pid) if tree else [pid])


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for each in pids:
        fields = _stat_fields(each)
        if len(fields) > 13:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def _status(pid: int) -> dict[str, str]:
    try:
        lines = (_PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return {}
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def _kib(value: str | None) -> int:
    return int(value.split()[0]) * 1024 if value else 0


def sample(pid: int, *, tree: bool = True) -> ProcSample:
    pids = descendants(pid) if tree else [pid]
    rss = hwm = fds = threads = 0
    for each in pids:
        status = _status(each)
        rss += _kib(status.get("VmRSS"))
        hwm += _kib(status.get("VmHWM"))
        threads += int(status.get("Threads", "0") or 0)
        with contextlib.suppress(OSError):
            fds += len(os.listdir(_PROC / str(each) / "fd"))
    return ProcSample(_cpu_seconds(pids), rss, hwm, fds, threads)


def fd_limit(pid: int) -> int | None:
    """The soft limit of open files of `pid` ("Max open files" in /proc/PID/limits); None when
    unreadable or unlimited."""
    try:
        lines = (_PROC / str(pid) / "limits").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            return int(soft) if soft.isdigit() else None
    return None


def set_affinity(pid: int, cpus: set[int]) -> bool:
    """Pin `pid` (0: this process) to `cpus`; False where that is not possible."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        return False
    return True
