"""What the load goes through: proxygate, a peer (pproxy, proxy.py), or nothing ("direct").

proxygate runs as `python -m gateway run --config FILE` with a generated TOML file, the pool's
upstreams in a proxies file beside it, and its admin API on a port of its own; the harness
reads `/api/stats` from it. Where its asyncio tasks are counted, it runs the same way under
`loadtest.taskprobe`, which writes the count to a file beside the configuration. The peers
run from the harness's virtualenv (`loadtest.peers`) over the same upstreams: pproxy with
`-s rr`, proxy.py with its `ProxyPoolPlugin` (HTTP upstreams only). "direct" is the client
talking to the fleet's first upstream itself: the floor of latency and throughput. "floor" is
`loadtest.floor`, a bare byte relay to the first upstream: the floor of a Python gateway's
CPU per request. Another build of proxygate (`--compare ref:REF`, `loadtest.builds`) runs the
same way from its own venv's interpreter, named `proxygate@SHA7`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import procs
from loadtest.peers import PEERS, bench_python, isolated_env
from loadtest.procstat import ProcSample, descendants, sample, set_affinity
from loadtest.rig import RigUpstream, child_env
from loadtest.taskprobe import read_count

__all__ = [
    "GatewayConfig",
    "GatewayRefused",
    "Running",
    "TargetError",
    "admin_get",
    "start_direct",
    "start_peer",
    "start_proxygate",
]

LISTEN_HOST = "127.0.0.1"
#: The task-counting wrapper, run by path when another build's interpreter runs it.
TASKPROBE = str(Path(__file__).resolve().with_name("taskprobe.py"))


class TargetError(RuntimeError):
    """A target did not start; the message says why."""


class GatewayRefused(TargetError):
    """proxygate exited at start-up; the message is what it said."""


@dataclass(frozen=True)
class GatewayConfig:
    upstreams: tuple[str, ...]
    storage: str = "memory://"
    selector: str = "round_robin"
    sticky_ttl: float = 600.0
    retries: int = 2
    max_concurrency: int | None = None
    acquire_timeout: float = 5.0
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    drain_timeout: float = 5.0
    log_level: str = "warning"
    #: Kept connections per upstream (0: a new upstream connection per request); None keeps
    #: the gateway's default.
    keepalive_max_idle: int | None = None
    #: How plain HTTP goes through HTTP upstreams ("forward", "connect"); None keeps the
    #: gateway's default.
    http_upstream_mode: str | None = None
    #: The gateway's active health checks (a round over every upstream at start).
    checks: bool = True


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(config: GatewayConfig, directory: Path, port: int, admin_port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    proxies = directory / "upstreams.txt"
    proxies.write_text("\n".join(config.upstreams) + "\n")
    lines = [
        "# Written by loadtest for one run.",
        "[gateway]",
        f'listen = ["{LISTEN_HOST}:{port}"]',
        'default_pool = "bench"',
        f"acquire_timeout = {config.acquire_timeout}",
        f"connect_timeout = {config.connect_timeout}",
        f"idle_timeout = {config.idle_timeout}",
        f"drain_timeout = {config.drain_timeout}",
        f"log_level = {_toml_string(config.log_level)}",
        *(
            []
            if config.keepalive_max_idle is None
            else [f"keepalive_max_idle = {config.keepalive_max_idle}"]
        ),
        *(
            []
            if config.http_upstream_mode is None
            else [f"http_upstream_mode = {_toml_string(config.http_upstream_mode)}"]
        ),
        "",
        "[storage]",
        f"url = {_toml_string(config.storage)}",
        "",
        "[admin]",
        f'listen = "{LISTEN_HOST}:{admin_port}"',
        "",
        "[checks]",
        f"enabled = {'true' if config.checks else 'false'}",
        "",
        "[[pools]]",
        'name = "bench"',
        f"selector = {_toml_string(config.selector)}",
        f"sticky_ttl = {config.sticky_ttl}",
        f"retries = {config.retries}",
        f'proxies_file = "{proxies.name}"',
    ]
    if config.max_concurrency is not None:
        lines.append(f"max_concurrency = {config.max_concurrency}")
    path = directory / "proxygate.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Running:
    """A started target; `pid` None for "direct"."""

    def __init__(
        self,
        name: str,
        listen: tuple[str, int],
        process: subprocess.Popen[bytes] | None,
        log: Path | None,
        admin: tuple[str, int] | None = None,
        tasks_file: Path | None = None,
    ) -> None:
        self.name = name
        self.listen = listen
        self.process = process
        self.log = log
        self.admin = admin
        self.tasks_file = tasks_file

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def sample(self) -> ProcSample | None:
        return sample(self.pid) if self.pid is not None else None

    def tasks(self) -> int | None:
        """The target's asyncio tasks, when they are counted (see `loadtest.taskprobe`)."""
        return read_count(self.tasks_file) if self.tasks_file is not None else None

    def pin(self, cpus: set[int]) -> bool:
        if self.pid is None:
            return False
        return all(set_affinity(pid, cpus) for pid in descendants(self.pid))

    async def stats(self) -> dict[str, Any] | None:
        if self.admin is None:
            return None
        return await admin_get(self.admin, "/api/stats")

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        return await procs.stop(self.process, grace=15.0)

    def output(self) -> str:
        return procs.tail(self.log, 20) if self.log is not None else ""


async def admin_get(address: tuple[str, int], path: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET a JSON document from the admin API (a plain socket: no client library needed)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        raise TargetError(f"GET {path} answered {head[:60]!r}")
    document: dict[str, Any] = json.loads(body)
    return document


async def start_proxygate(
    config: GatewayConfig,
    workdir: Path,
    *,
    ready_timeout: float = 60.0,
    count_tasks: bool = False,
    name: str = "proxygate",
    python: Path | None = None,
) -> Running:
    """This tree's gateway, or with `python` (another build's venv, `loadtest.builds`) that
    build's, from the same configuration."""
    port, admin_port = procs.free_port(LISTEN_HOST), procs.free_port(LISTEN_HOST)
    path = write_config(config, workdir, port, admin_port)
    log = workdir / "proxygate.log"
    tasks_file = workdir / "tasks.txt" if count_tasks else None
    if python is None:
        command = [sys.executable, "-m"]
        command += ["gateway"] if tasks_file is None else ["loadtest.taskprobe", str(tasks_file)]
        env = child_env()
    else:
        # -P and no PYTHONPATH: neither the working directory nor this tree is on sys.path, so
        # `gateway` is the one installed in that venv. The probe runs by path, as a script.
        command = [str(python), "-P"]
        command += ["-m", "gateway"] if tasks_file is None else [TASKPROBE, str(tasks_file)]
        env = isolated_env()
    process = procs.spawn([*command, "run", "--config", str(path)], log, env=env)
    running = Running(
        name,
        (LISTEN_HOST, port),
        process,
        log,
        admin=(LISTEN_HOST, admin_port),
        tasks_file=tasks_file,
    )
    deadline = asyncio.get_running_loop().time() + ready_timeout
    while asyncio.get_running_loop().time() < deadline:
        if process.poll() is not None:
            raise GatewayRefused(
                f"{name} exited with status {process.returncode} at start-up: "
                + (running.output().strip() or "(no output)")
            )
        try:
            await admin_get(running.admin or (LISTEN_HOST, admin_port), "/healthz", 1.0)
        except (OSError, TargetError, TimeoutError, ValueError):
            await asyncio.sleep(0.05)
            continue
        if await procs.wait_listening(process, LISTEN_HOST, port, 5.0):
            return running
    await running.stop()
    raise TargetError(f"{name} was not ready within {ready_timeout:g} s: {running.output()}")


def start_direct(upstream: RigUpstream) -> Running:
    return Running("direct", (upstream.host, upstream.port), None, None)


async def start_peer(name: str, upstreams: list[RigUpstream], workdir: Path) -> Running:
    python = bench_python()
    port = procs.free_port(LISTEN_HOST)
    if name == "floor":
        first = upstreams[0]
        # The harness's own interpreter: the floor is ours, and needs only uvloop.
        command = [sys.executable, "-m", "loadtest.floor", str(port), first.host, str(first.port)]
    elif name == "pproxy":
        command = [str(python), "-m", "pproxy", "-l", f"http+socks5://{LISTEN_HOST}:{port}"]
        for upstream in upstreams:
            command += ["-r", upstream.url]
        command += ["-s", "rr"]
    elif name == "proxy.py":
        if any(u.kind != "http" for u in upstreams):
            raise TargetError("proxy.py's ProxyPoolPlugin takes HTTP upstreams only")
        command = [str(python), "-m", "proxy", "--hostname", LISTEN_HOST, "--port", str(port)]
        command += ["--plugins", "proxy.plugin.ProxyPoolPlugin"]
        for upstream in upstreams:
            command += ["--proxy-pool", f"{upstream.host}:{upstream.port}"]
        # One worker and one acceptor: one core's worth, like the others.
        command += ["--num-workers", "1", "--num-acceptors", "1", "--log-level", "WARNING"]
    else:
        raise TargetError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    log = workdir / f"{name}.log"
    env = child_env() if name == "floor" else isolated_env()
    process = procs.spawn(command, log, env=env, make_parent=True)
    running = Running(name, (LISTEN_HOST, port), process, log)
    if not await procs.wait_listening(process, LISTEN_HOST, port, 20.0):
        await running.stop()
        raise TargetError(f"{name} did not start: {running.output()}")
    return running
