"""The load generator: closed loop (N clients back to back) or open loop (a fixed arrival rate).

A run has a warm-up, then a measured window; both are bounded by time, and by a request count
when one is given. Only what completes inside the window counts towards requests, bytes and
latency; errors are counted over the whole run. `marks("start")` and `marks("end")` are called
at the window's two edges, so the caller can read the gateway's CPU exactly there.

Latency is taken from when a request was due: in the open loop that is its scheduled arrival,
so a stalled server shows up in the percentiles instead of silently slowing the load
(coordinated omission). In the closed loop it is when the client started the request,
including opening a connection or tunnel when one is opened for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.client import ClientError, Conn, Counters, Plan, classify, open_conn
from loadtest.hdr import Histogram

__all__ = ["LoadResult", "LoadSpec", "Progress", "run_load"]

#: uvloop's loop.time() moves in whole milliseconds: every timestamp here comes from this.
_now = time.monotonic
#: Timeline resolution, seconds.
TICK = 1.0
#: Pause after a failed request, so a dead path does not turn into a busy loop.
ERROR_BACKOFF = 0.005


@dataclass(frozen=True, slots=True)
class Progress:
    elapsed: float
    total: float
    phase: str  # "warmup" or "measure"
    rate: float  # requests/s over the last tick
    bytes_rate: float
    requests: int
    errors: int
    in_flight: int


@dataclass(frozen=True)
class LoadSpec:
    plan: Plan
    connections: int = 16  # closed loop: clients; open loop: most requests in flight
    duration: float = 10.0  # the measured window, seconds
    warmup: float = 1.0
    rate: float | None = None  # requests/s: open loop; None: closed loop at max rate
    max_requests: int | None = None
    timeout: float = 10.0  # per request, connection set-up included
    sessions: int = 0  # sticky: requests spread over this many session ids
    who: bool = False  # read which upstream carried each request (the /who body)


@dataclass
class LoadResult:
    requests: int = 0
    bytes: int = 0
    seconds: float = 0.0
    histogram: Histogram = field(default_factory=Histogram)
    errors: Counter[str] = field(default_factory=Counter)
    window_errors: int = 0
    total_requests: int = 0
    connections_opened: int = 0
    timeline: list[dict[str, float]] = field(default_factory=list)
    #: session -> the upstream addresses seen carrying it (sticky runs).
    sessions: dict[str, set[str]] = field(default_factory=dict)
    #: Requests still running when the run ended, cancelled (and not counted anywhere else).
    cancelled: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def bytes_rate(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0

    def sticky_summary(self) -> dict[str, Any] | None:
        if not self.sessions:
            return None
        moved = sum(1 for seen in self.sessions.values() if len(seen) > 1)
        return {"sessions": len(self.sessions), "moved": moved}


class _Run:
    """The state one run shares between its clients, ticker and stopper."""

    def __init__(
        self,
        spec: LoadSpec,
        marks: Callable[[str], None],
        progress: Callable[[Progress], None] | None,
    ) -> None:
        self.spec = spec
        self.plan = spec.plan.with_tls_context()
        self.loop = asyncio.get_running_loop()
        self.marks = marks
        self.progress = progress
        self.counters = Counters()
        self.result = LoadResult()
        self.start = _now()
        self.window_start = self.start + spec.warmup
        self.end = self.window_start + spec.duration
        self.in_window = False
        self.window_ended = False
        self.window_bytes_end = 0
        self.issued = 0
        self.in_flight = 0
        self.window_bytes_start = 0
        self.sessions = itertools.cycle([f"s{i}" for i in range(spec.sessions)] or [None])
        self.request_cache: dict[str | None, bytes] = {}
        self.stop = asyncio.Event()

    def admit(self) -> bool:
        if self.stop.is_set() or _now() >= self.end:
            return False
        if self.spec.max_requests is not None and self.issued >= self.spec.max_requests:
            self.stop.set()
            return False
        self.issued += 1
        return True

    def request_bytes(self, session: str | None) -> bytes:
        data = self.request_cache.get(session)
        if data is None:
            data = self.request_cache[session] = self.plan.request(session)
        return data

    async def connect(self, session: str | None) -> Conn:
        self.result.connections_opened += 1
        return await open_conn(self.plan, self.counters, session)

    async def one(self, conn: Conn | None, due: float) -> Conn | None:
        """One request (opening a connection when needed); the connection to reuse, if any."""
        session = next(self.sessions)
        result = self.result
        self.in_flight += 1
        # A session through a tunnel is chosen when the tunnel opens: one tunnel per request.
        fresh = conn is None or conn.closed or (session is not None and self.plan.mode != "http")
        try:
            async with asyncio.timeout(self.spec.timeout):
                if fresh or conn is None:
                    if conn is not None:
                        conn.close()
                        conn = None
                    conn = await self.connect(session)
                response = await conn.request(self.request_bytes(session), capture=self.spec.who)
            if response.status >= 400:
                raise ClientError(f"http_{response.status}")
        except (OSError, ClientError, TimeoutError) as exc:
            self.error(classify(exc))
            if conn is not None:
                conn.abort()
            await asyncio.sleep(ERROR_BACKOFF)
            return None
        finally:
            self.in_flight -= 1
        now = _now()
        self.counters.requests += 1
        result.total_requests += 1
        if self.window_start <= now < self.end:
            result.requests += 1
            result.histogram.record(int((now - due) * 1e9))
        if self.spec.who and response.body is not None and session is not None:
            result.sessions.setdefault(session, set()).add(response.body.decode("latin-1"))
        if not (self.plan.keepalive and conn.keep_alive) or conn.closed:
            conn.close()
            return None
        return conn

    def error(self, kind: str) -> None:
        self.result.errors[kind] += 1
        self.counters.errors += 1
        if self.window_start <= _now() < self.end:
            self.result.window_errors += 1

    async def closed_client(self) -> None:
        conn: Conn | None = None
        try:
            while self.admit():
                conn = await self.one(conn, _now())
        finally:
            if conn is not None:
                conn.close()

    async def open_dispatcher(self) -> None:
        """Arrivals at a fixed rate; each borrows an idle connection or opens one."""
        assert self.spec.rate
        interval = 1.0 / self.spec.rate
        idle: list[Conn] = []
        tasks: set[asyncio.Task[None]] = set()

        async def arrival(due: float) -> None:
            conn = None
            while idle and conn is None:
                candidate = idle.pop()
                conn = None if candidate.closed else candidate
            kept = await self.one(conn, due)
            if kept is not None:
                idle.append(kept)

        due = _now()
        try:
            while self.admit():
                if self.in_flight >= self.spec.connections:
                    self.error("overload")  # the arrival is dropped, and counted
                else:
                    task = self.loop.create_task(arrival(due), name="loadgen-arrival")
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                due += interval
                delay = due - _now()
                if delay > 0:
                    await asyncio.sleep(delay)
            if tasks:
                await asyncio.wait(set(tasks), timeout=self.spec.timeout + 1.0)
        finally:
            for task in tasks:
                task.cancel()
            self.result.cancelled += len(tasks)
            for conn in idle:
                conn.close()

    def mark_start(self) -> None:
        self.in_window = True
        self.window_bytes_start = self.counters.bytes
        self.marks("start")

    def mark_end(self) -> None:
        self.window_ended = True
        self.window_bytes_end = self.counters.bytes
        self.marks("end")

    async def ticker(self) -> None:
        """Opens and closes the window on time, and samples the timeline every TICK."""
        counters = self.counters
        last_t, last_requests, last_bytes, last_errors = self.start, 0, 0, 0
        next_tick = self.start + TICK
        while not self.window_ended:
            now = _now()
            if not self.in_window and now >= self.window_start:
                self.mark_start()
            if now >= self.end:
                self.mark_end()
            edge = self.end if self.in_window else self.window_start
            await asyncio.sleep(max(0.0, min(next_tick, edge) - now))
            now = _now()
            if now < next_tick - 0.001:
                continue
            next_tick += TICK
            span = now - last_t
            sample = {
                "t": round(now - self.start, 3),
                "requests_per_s": (counters.requests - last_requests) / span,
                "bytes_per_s": (counters.bytes - last_bytes) / span,
                "errors_per_s": (counters.errors - last_errors) / span,
                "in_flight": float(self.in_flight),
            }
            self.result.timeline.append(sample)
            last_t, last_requests = now, counters.requests
            last_bytes, last_errors = counters.bytes, counters.errors
            if self.progress is not None:
                self.progress(
                    Progress(
                        elapsed=now - self.start,
                        total=self.end - self.start,
                        phase="measure" if self.in_window else "warmup",
                        rate=sample["requests_per_s"],
                        bytes_rate=sample["bytes_per_s"],
                        requests=counters.requests,
                        errors=counters.errors,
                        in_flight=self.in_flight,
                    )
                )


async def run_load(
    spec: LoadSpec,
    marks: Callable[[str], None] = lambda _: None,
    progress: Callable[[Progress], None] | None = None,
) -> LoadResult:
    run = _Run(spec, marks, progress)
    ticker = run.loop.create_task(run.ticker(), name="loadgen-ticker")
    if spec.rate:
        clients = [run.loop.create_task(run.open_dispatcher(), name="loadgen-open-loop")]
    else:
        clients = [
            run.loop.create_task(run.closed_client(), name=f"loadgen-client-{i}")
            for i in range(spec.connections)
        ]
    try:
        # Clients stop issuing at the window's end; what is in flight may take `timeout`.
        budget = spec.warmup + spec.duration + spec.timeout + 2.0
        _, pending = await asyncio.wait(clients, timeout=budget)
        for task in pending:
            task.cancel()
        run.result.cancelled += len(pending)
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for task in clients:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    end = min(_now(), run.end)
    if not run.in_window:  # stopped (by the request count) before the window opened
        run.window_start = run.start
        run.mark_start()
    if not run.window_ended:
        run.mark_end()
    run.result.seconds = max(end - run.window_start, 1e-9)
    run.result.bytes = run.window_bytes_end - run.window_bytes_start
    return run.result
