"""Child processes of the harness: started in their own session, logged to a file, stopped by pid.

Every process the harness starts goes through `spawn` and is stopped with `stop` (SIGTERM, then
SIGKILL after a grace period), always by its own pid: nothing else on the machine is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import resource
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "free_port",
    "keep_freed_memory",
    "raise_fd_limit",
    "spawn",
    "stop",
    "tail",
    "wait_listening",
]

# glibc's mallopt() parameters (malloc.h), and its largest mmap threshold on 64-bit.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEPT_BLOCK = 32 * 1024 * 1024


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that was free a moment ago (bound and released)."""
    with socket.socket(socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (children started
    afterwards inherit it); the limit now in force. Many hosts default the soft limit to
    1,024, far below what a run holding thousands of connections needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        # An unlimited hard limit is not a valid soft limit for files: use the kernel's cap.
        target = hard if hard != resource.RLIM_INFINITY else _nr_open()
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def keep_freed_memory() -> bool:
    """Have the C allocator keep the memory this process frees for its next allocations;
    False where it could not be asked (no glibc).

    Every read of bulk bytes allocates an object of up to 256 KiB. By default glibc gives such
    blocks back to the kernel when they are freed (unmapped, or trimmed off the heap's top),
    and the next one is faulted in again page by page. In a virtual machine that hands freed
    pages back to its host, the load generator then spent a quarter of its CPU in page faults,
    and runs of `connect-throughput` fell to half their rate for minutes at a time. Only the
    harness's own processes (load generator, rig) call this: the gateway and the peers it is
    compared with keep the allocator's defaults, as users run them."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    answers: list[int] = [
        mallopt(_M_MMAP_THRESHOLD, _KEPT_BLOCK),
        mallopt(_M_TRIM_THRESHOLD, 2 * _KEPT_BLOCK),
    ]
    return answers == [1, 1]


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


def spawn(
    command: Sequence[str],
    output: Path,
    *,
    env: Mapping[str, str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
    make_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `command` in its own session, stdout and stderr to `output`."""
    if make_parent:
        output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as sink:
        return subprocess.Popen(
            list(command),
            stdin=stdin,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )


async def wait_listening(
    process: subprocess.Popen[bytes], host: str, port: int, timeout: float
) -> bool:
    """Whether `host:port` accepts connections within `timeout` while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


async def stop(process: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """SIGTERM `process` (by pid), SIGKILL it after `grace` seconds; its exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        deadline = time.monotonic() + grace
        # A child process gives the event loop nothing to wait on: poll, briefly.
        while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    return process.wait()


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file ("" when unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
