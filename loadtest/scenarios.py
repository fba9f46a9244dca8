"""The scenarios: what load, through what, for how long, and what figure they are judged by.

Every figure can be changed from the command line; these are the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loadtest.toxics import FaultStep, Toxics

__all__ = ["SCENARIOS", "Scenario", "default_faults"]

SMALL = 128
BULK = 64 * 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    mode: str  # client: "http" (absolute-form), "connect", "socks5"
    kind: str  # upstream fleet: "http" or "socks5"
    keepalive: bool
    body: int  # bytes per response; 0 asks /who (which upstream carried it)
    unit: str  # "us/req", "cpu-s/GB" (gateway CPU per request, per GB), "KiB/tunnel" (RSS)
    connections: int = 16
    duration: float = 10.0
    warmup: float = 2.0
    upstreams: int = 4
    timeout: float = 10.0
    sessions: int = 0
    #: Peers it can be compared with (--compare).
    compare: tuple[str, ...] = ()
    #: GatewayConfig fields that differ from the defaults.
    gateway: dict[str, float | int | bool] = field(default_factory=dict)
    #: Idle tunnels to hold (idle-tunnels: `connections` is then how many open at once).
    tunnels: int = 0
    #: Run the gateway under `loadtest.taskprobe`, which counts its asyncio tasks.
    count_tasks: bool = False


_PEERS = ("pproxy", "proxy.py", "direct", "floor")

SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "http-keepalive",
            "small GETs over keep-alive client connections, rotating per request",
            "http", "http", True, SMALL, "us/req", connections=32, compare=_PEERS,
        ),
        Scenario(
            "http-newconn",
            "small GETs, a new client connection for every request",
            "http", "http", False, SMALL, "us/req", connections=16, compare=_PEERS,
        ),
        Scenario(
            "connect-throughput",
            "bulk downloads through CONNECT tunnels, a tunnel per download",
            "connect", "http", False, BULK, "cpu-s/GB", connections=4, compare=_PEERS,
        ),
        Scenario(
            "socks5",
            "bulk downloads through SOCKS5 tunnels over SOCKS5 upstreams",
            "socks5", "socks5", False, BULK, "cpu-s/GB", connections=4,
            compare=("pproxy", "direct"),
        ),
        Scenario(
            "sticky",
            "many sessions (X-Proxy-Session), each checked to stay on one upstream",
            "http", "http", True, 0, "us/req", connections=16, sessions=200,
            gateway={"sticky_ttl": 2.0},
        ),
        Scenario(
            "faults",
            "keep-alive GETs while upstreams die, blackhole, reset and crawl on a schedule",
            "http", "http", True, 1024, "us/req", connections=32, upstreams=8, timeout=3.0,
            duration=12.0, gateway={"connect_timeout": 1.5, "idle_timeout": 10.0},
        ),
        Scenario(
            "soak",
            "a long keep-alive run watching the gateway's RSS, fds, threads and tasks",
            "http", "http", True, 1024, "us/req", connections=32, duration=60.0, warmup=10.0,
            count_tasks=True,
        ),
        Scenario(
            "idle-tunnels",
            "many CONNECT tunnels held open and idle: the gateway's RSS per tunnel",
            "connect", "http", True, SMALL, "KiB/tunnel", connections=64, duration=5.0,
            warmup=2.0, tunnels=10_000, count_tasks=True,
        ),
        Scenario(
            "storage",
            "http-newconn once per storage URL (--storage), compared with the first",
            "http", "http", False, SMALL, "us/req", connections=16,
        ),
        Scenario(
            "scale",
            "http-keepalive at each pool size (--pool-sizes), compared with the smallest; "
            "a new upstream connection per request and no active checks at every size",
            "http", "http", True, SMALL, "us/req", connections=32, duration=8.0,
            # Pool size is the one thing that changes: with 100,000 upstreams in rotation no
            # kept connection is ever lent again, so none are kept at any size
            # (--upstream-keepalive puts them back); and the checks' first round over every
            # new upstream, a start-up burst paced by [checks], stays out of the figure.
            gateway={"keepalive_max_idle": 0, "checks": False},
        ),
    )
}  # fmt: skip


def default_faults(total: float, upstreams: int) -> list[FaultStep]:
    """The `faults` scenario's schedule over a run of `total` seconds (warm-up included):
    a quarter of the fleet breaks early, other faults join midway, everything heals late."""
    if upstreams < 8:
        raise ValueError("the default fault schedule needs at least 8 upstreams")
    steps = [
        (0.15, (0,), "down"),
        (0.15, (1,), "timeout=0"),
        (0.15, (2,), "reset_peer=0"),
        (0.15, (3,), "latency=300,jitter=100"),
        (0.45, (0,), "clear"),
        (0.45, (4,), "bandwidth=50"),
        (0.45, (5,), "limit_data=40"),
        (0.45, (6,), "slow_close=300"),
        (0.75, tuple(range(upstreams)), "clear"),
    ]
    return [FaultStep(round(at * total, 2), which, Toxics.parse(spec)) for at, which, spec in steps]
