"""wrk as the load generator (`--loadgen wrk`), where it is installed and the scenario allows.

wrk drives keep-alive HTTP/1.1 clients from C as fast as they go: a figure that owes nothing to
the harness's own Python client. It speaks to each target as to an HTTP proxy (the absolute-form
target in the request line, the origin in `Host`), closed loop, one thread, `-c` connections;
`Connection: close` on every request when the scenario opens a connection per request (wrk
connects again after each answer). Open loop, a request count, sessions, tunnels and SOCKS5 are
the built-in generator's alone.

A warm-up run comes first and is thrown away; the measured run is a second one, between the
marks the harness reads the target's CPU at. Its `done()` hook prints the run's totals and every
latency it recorded (microseconds, each with its count), which become the same `LoadResult` the
built-in generator returns: the report, the JSON and the chart treat both alike. Bytes are what
wrk read, response heads included; requests are answers with a 2xx or 3xx status, the others
counted as `status` errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from loadtest.client import Plan
from loadtest.loadgen import LoadResult, LoadSpec

__all__ = ["ALLOWED_SCENARIOS", "WrkError", "available", "parse", "run_wrk", "script_for"]

#: Scenarios whose load wrk can make: plain HTTP through a proxy, closed loop.
ALLOWED_SCENARIOS = ("http-keepalive", "http-newconn")
_ERROR_KINDS = ("connect", "read", "write", "status", "timeout")
#: Seconds beyond its own duration a wrk run may take before it is killed.
_GRACE = 10.0


class WrkError(RuntimeError):
    pass


def available() -> bool:
    return shutil.which("wrk") is not None


def script_for(plan: Plan) -> str:
    """The Lua script of a run: the request, and the `done()` hook that reports it."""
    target = f"http://{plan.origin[0]}:{plan.origin[1]}{plan.path}"
    lines = [
        f'wrk.path = "{target}"',
        f'wrk.headers["Host"] = "{plan.origin[0]}:{plan.origin[1]}"',
    ]
    if not plan.keepalive:
        lines.append('wrk.headers["Connection"] = "close"')
    lines.append(
        """done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("total %d %d %d %d %d %d %d %d\\n", summary.duration,
    summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout))
  for i = 1, #latency do
    local value, count = latency(i)
    io.write(string.format("latency %d %d\\n", value, count))
  end
end"""
    )
    return "\n".join(lines) + "\n"


def parse(output: str) -> LoadResult:
    """A `LoadResult` from what `done()` printed."""
    result = LoadResult()
    total: list[int] | None = None
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word == "total":
            total = [int(field) for field in rest.split()]
        elif word == "latency":
            micros, count = (int(field) for field in rest.split())
            result.histogram.record(micros * 1000, count)
    if total is None or len(total) != 3 + len(_ERROR_KINDS):
        raise WrkError(f"wrk printed no summary: {output.strip()[-300:]}")
    duration, answers, read, *errors = total
    result.seconds = max(duration / 1e6, 1e-9)
    result.bytes = read
    for kind, count in zip(_ERROR_KINDS, errors, strict=True):
        if count:
            result.errors[kind] = count
    # wrk counts every answer it read, a failing status too.
    result.requests = result.total_requests = answers - errors[_ERROR_KINDS.index("status")]
    result.window_errors = sum(errors)
    return result


async def run_wrk(
    spec: LoadSpec, marks: Callable[[str], None], *, log_dir: Path | None = None
) -> LoadResult:
    """What `loadgen.run_load` does, with wrk making the load; no progress on the way (wrk
    reports once, at its end), and its output kept in `log_dir`."""
    with tempfile.TemporaryDirectory(prefix="loadtest-wrk-") as scratch:
        script = Path(scratch) / "run.lua"
        script.write_text(script_for(spec.plan))
        warmup = None
        if spec.warmup > 0:
            warmup = parse(await _wrk(spec, script, spec.warmup, log_dir, "warmup"))
        marks("start")
        try:
            result = parse(await _wrk(spec, script, spec.duration, log_dir, "measure"))
        finally:
            marks("end")
    if warmup is not None:  # counted as the built-in generator counts it: in the totals only
        result.total_requests += warmup.total_requests
        result.errors.update(warmup.errors)
    return result


async def _wrk(
    spec: LoadSpec, script: Path, seconds: float, log_dir: Path | None, phase: str
) -> str:
    host, port = spec.plan.proxy
    whole = max(1, math.ceil(seconds))  # wrk takes whole seconds
    command = [
        "wrk",
        "--threads",
        "1",
        "--connections",
        str(spec.connections),
        "--duration",
        f"{whole}s",
        "--timeout",
        f"{max(1, math.ceil(spec.timeout))}s",
        "--script",
        str(script),
        f"http://{host}:{port}/",
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), whole + _GRACE)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    text = out.decode(errors="replace")
    if log_dir is not None:
        _keep_log(log_dir / f"wrk-{phase}.log", text)
    if process.returncode != 0:
        raise WrkError(f"wrk exited with status {process.returncode}: {text.strip()[-300:]}")
    return text


def _keep_log(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
