"""The rig: origin and upstream fleet, in a process of their own (`python -m loadtest.rig SPEC`).

A process apart keeps the rig's CPU out of the load generator's event loop and lets it be
pinned away from the gateway. The harness talks to it over pipes, one JSON object a line:

- argv[1] is the spec: `{"origin": "builtin"|"nginx"|"none", "sizes": [...], "fleet":
  "sim"|"debian", "kinds": ["http", "socks5", ...], "first": 0, "workdir": "...", "cpus": [1]}`.
  `first` numbers the upstreams from there (their addresses too), so that several rig
  processes can share one fleet between them; `"origin": "none"` starts no origin. Both are for
  runs that hold more connections than one process may have files open.
- The rig answers `{"ready": true, "origin": {...} or null, "upstreams": [{"url", "host", "port",
  "kind"}]}` (or `{"ready": false, "error": "..."}`), then reads commands from stdin:
  `{"op": "apply", "upstreams": [0, 1], "toxics": {...}}`, `{"op": "stats"}`, `{"op": "stop"}`,
  each answered by one line with `"ok"`.
- End of stdin (the harness went away) stops it too: it never outlives its harness.

The rig raises its own soft limit of open files to the hard limit (every tunnel through it is
two connections on a fleet upstream, one on the origin).

`Rig` is the harness's side of the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest import procs
from loadtest.fleet import SimUpstream, egress_address
from loadtest.origin import BuiltinOrigin, NginxOrigin, OriginAddress
from loadtest.procstat import set_affinity
from loadtest.toxics import Toxics

__all__ = ["Rig", "RigError", "RigUpstream", "tinyproxy_config"]

READY_TIMEOUT = 30.0
COMMAND_TIMEOUT = 15.0
REPO = Path(__file__).resolve().parent.parent


class RigError(RuntimeError):
    """The rig did not start or did not answer; the message carries its output."""


@dataclasses.dataclass(frozen=True, slots=True)
class RigUpstream:
    url: str
    host: str
    port: int
    kind: str  # "http" or "socks5"


def child_env() -> dict[str, str]:
    """The environment for the harness's Python children: this repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Rig:
    """The harness's handle on a running rig process."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        origin: OriginAddress | None,
        upstreams: list[RigUpstream],
        fleet: str,
        log: Path,
    ) -> None:
        self.process = process
        self._origin = origin
        self.upstreams = upstreams
        self.fleet = fleet
        self.log = log
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def origin(self) -> OriginAddress:
        if self._origin is None:
            raise RigError("this rig process was started without an origin")
        return self._origin

    @classmethod
    async def start(cls, spec: dict[str, Any], workdir: Path) -> Rig:
        log = workdir / "rig.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "loadtest.rig",
                json.dumps({**spec, "workdir": str(workdir)}),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=sink,
                env=child_env(),
                start_new_session=True,
            )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT)
            answer = json.loads(line) if line.strip() else {}
        except (TimeoutError, json.JSONDecodeError):
            answer = {}
        if not answer.get("ready"):
            await _end(process)
            why = answer.get("error") or procs.tail(log) or "no answer"
            raise RigError(f"the rig did not start: {why}")
        origin = OriginAddress(**answer["origin"]) if answer.get("origin") else None
        upstreams = [RigUpstream(**u) for u in answer["upstreams"]]
        return cls(process, origin, upstreams, spec.get("fleet", "sim"), log)

    async def command(self, op: str, **fields: Any) -> dict[str, Any]:
        async with self._lock:
            stdin, stdout = self.process.stdin, self.process.stdout
            assert stdin is not None
            assert stdout is not None
            stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
            try:
                await stdin.drain()
                line = await asyncio.wait_for(stdout.readline(), COMMAND_TIMEOUT)
            except (TimeoutError, ConnectionError) as exc:
                raise RigError(f"the rig did not answer {op!r}: {exc!r}") from None
            if not line:
                raise RigError(f"the rig exited: {procs.tail(self.log)}")
            answer: dict[str, Any] = json.loads(line)
            return answer

    async def apply(self, upstreams: tuple[int, ...], toxics: Toxics) -> None:
        answer = await self.command("apply", upstreams=list(upstreams), toxics=toxics.to_json())
        if not answer.get("ok"):
            raise RigError(answer.get("error", "the rig refused the faults"))

    async def stats(self) -> list[dict[str, int]]:
        answer = await self.command("stats")
        stats: list[dict[str, int]] = answer.get("upstreams", [])
        return stats

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(RigError, OSError):
                await self.command("stop")
        await _end(self.process)


async def _end(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None:
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), 10.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


# -- the rig process --------------------------------------------------------------------------


class _DebianFleet:
    """microsocks (SOCKS5) and tinyproxy (HTTP) processes: honest, but no faults."""

    def __init__(self, kinds: list[str], workdir: Path) -> None:
        self.kinds = kinds
        self.workdir = workdir / "debian-fleet"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.upstreams: list[RigUpstream] = []

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for index, kind in enumerate(self.kinds):
            host = egress_address(index)
            port = procs.free_port(host)
            directory = self.workdir / str(index)
            directory.mkdir()
            if kind == "socks5":
                program = _which("microsocks")
                command = [program, "-i", host, "-p", str(port), "-b", host]
            else:
                program = _which("tinyproxy")
                config = directory / "tinyproxy.conf"
                config.write_text(tinyproxy_config(host, port, directory))
                command = [program, "-d", "-c", str(config)]
            process = procs.spawn(command, directory / "output.txt")
            self.processes.append(process)
            if not await procs.wait_listening(process, host, port, 10.0):
                raise RuntimeError(
                    f"{Path(command[0]).name} did not start: {procs.tail(directory / 'output.txt')}"
                )
            self.upstreams.append(RigUpstream(f"{kind}://{host}:{port}", host, port, kind))

    async def stop(self) -> None:
        for process in self.processes:
            await procs.stop(process)


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install {name})")
    return path


def tinyproxy_config(host: str, port: int, directory: Path) -> str:
    """tinyproxy listening on and leaving from `host`, any loopback client, no Via header."""
    return "\n".join(
        [
            f"Port {port}",
            f"Listen {host}",
            f"Bind {host}",
            "Timeout 60",
            "MaxClients 1024",
            "Allow 127.0.0.0/8",
            "DisableViaHeader Yes",
            f'LogFile "{directory / "tinyproxy.log"}"',
            "LogLevel Error",
            f'PidFile "{directory / "tinyproxy.pid"}"',
            "",
        ]
    )


async def _serve(spec: dict[str, Any]) -> None:
    workdir = Path(spec["workdir"])
    set_affinity(0, set(spec.get("cpus") or []))
    origin: BuiltinOrigin | NginxOrigin | None = None
    if spec.get("origin", "builtin") == "nginx":
        origin = NginxOrigin("127.0.0.2", workdir, list(spec.get("sizes", [])))
    elif spec.get("origin", "builtin") == "builtin":
        origin = BuiltinOrigin("127.0.0.2", workdir)
    kinds: list[str] = list(spec.get("kinds", []))
    first = int(spec.get("first", 0))
    sims: list[SimUpstream] = []
    debian: _DebianFleet | None = None
    try:
        address = await origin.start() if origin is not None else None
        if spec.get("fleet", "sim") == "debian":
            debian = _DebianFleet(kinds, workdir)
            await debian.start()
            upstreams = debian.upstreams
        else:
            sims = [SimUpstream(i, kind) for i, kind in enumerate(kinds, start=first)]
            for sim in sims:
                await sim.start()
            upstreams = [RigUpstream(s.url, s.host, s.port, s.kind) for s in sims]
    except Exception as exc:
        _say({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        await _stop_all(origin, sims, debian)
        return
    _say(
        {
            "ready": True,
            "origin": dataclasses.asdict(address) if address is not None else None,
            "upstreams": [dataclasses.asdict(u) for u in upstreams],
        }
    )
    try:
        await _commands(sims, debian)
    finally:
        await _stop_all(origin, sims, debian)


async def _commands(sims: list[SimUpstream], debian: _DebianFleet | None) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        op = command.get("op")
        if op == "stop":
            _say({"ok": True})
            return
        if op == "stats":
            _say({"ok": True, "upstreams": [sim.stats() for sim in sims]})
        elif op == "apply":
            if debian is not None:
                _say({"ok": False, "error": "the Debian fleet takes no faults: use --fleet sim"})
                continue
            toxics = Toxics.from_json(command["toxics"])
            for index in command["upstreams"]:
                await sims[index].apply(toxics)
            _say({"ok": True})
        else:
            _say({"ok": False, "error": f"unknown op {op!r}"})


async def _stop_all(
    origin: BuiltinOrigin | NginxOrigin | None,
    sims: list[SimUpstream],
    debian: _DebianFleet | None,
) -> None:
    for sim in sims:
        await sim.stop()
    if debian is not None:
        await debian.stop()
    if origin is not None:
        await origin.stop()


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = json.loads(sys.argv[1])
    procs.raise_fd_limit()
    procs.keep_freed_memory()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        asyncio.run(_serve(spec))
    else:
        uvloop.run(_serve(spec))


if __name__ == "__main__":
    main()
