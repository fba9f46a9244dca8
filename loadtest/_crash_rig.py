"""The crash hunt's rig, in the hunt's own process: an origin, honest upstreams, fault injectors.

- the origin: `loadtest.origin.BuiltinOrigin` on 127.0.0.2 (`/bytes/N`, keep-alive);
- honest upstreams: simulated HTTP and SOCKS5 proxies (`loadtest.fleet.SimUpstream`), and
  Debian's `tinyproxy` and `microsocks` where installed (`debian=False` leaves them out);
- fault injectors: `ChaosRelay`s in front of simulated upstreams (a fault per connection at
  random, and phases of one kind, `refuse` included), two ports where nothing listens, and for
  the `dialing` pool two relays that blackhole every connection (the gateway is left dialing).

Every process it starts (the Debian programs) is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from loadtest import procs
from loadtest._crash_chaos import FAULT_KINDS, ChaosRelay
from loadtest._crash_gateway import Upstreams
from loadtest.fleet import SimUpstream
from loadtest.origin import BuiltinOrigin
from loadtest.rig import tinyproxy_config

__all__ = ["Rig", "debian_missing"]

ORIGIN_HOST = "127.0.0.2"
#: What a phase may force on one relay for a while.
PHASE_KINDS = ("refuse", *FAULT_KINDS)


def debian_missing() -> list[str]:
    return [name for name in ("tinyproxy", "microsocks") if shutil.which(name) is None]


class Rig:
    def __init__(self, workdir: Path, rng: random.Random, *, debian: bool) -> None:
        self.workdir = workdir
        self.rng = rng
        self.debian = debian
        self.origin = BuiltinOrigin(ORIGIN_HOST, workdir)
        self.origin_address: tuple[str, int] = (ORIGIN_HOST, 0)
        self.sims: list[SimUpstream] = []
        self.chaos: list[tuple[str, ChaosRelay]] = []  # (scheme, relay) in the mixed pool
        self.stallers: list[tuple[str, ChaosRelay]] = []  # the dialing pool's
        self.debian_urls: list[str] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self.counts: Counter[str] = Counter()
        self.phases: Counter[str] = Counter()
        self.stalled: Counter[str] = Counter()
        self.refused_ports = (procs.free_port(), procs.free_port())

    async def start(self) -> None:
        address = await self.origin.start()
        self.origin_address = (address.host, address.port)
        kinds = ("http", "socks5", "http", "socks5", "socks5")
        for index, kind in enumerate(kinds):
            sim = SimUpstream(index, kind, dial_timeout=2.0)
            await sim.start()
            self.sims.append(sim)
        for scheme, index in (("http", 0), ("socks5", 1), ("http", 2), ("socks5", 3)):
            backend = self.sims[index]
            relay = ChaosRelay(
                f"chaos-{len(self.chaos)}",
                (backend.host, backend.port),
                random.Random(self.rng.getrandbits(32)),
                self.counts,
            )
            await relay.start()
            self.chaos.append((scheme, relay))
        for scheme in ("http", "socks5"):
            # Never relays: its backend is never dialed.
            staller = ChaosRelay(
                "staller", ("127.0.0.1", 1), random.Random(0), self.stalled, fault_share=1.0
            )
            staller.force = "blackhole"
            await staller.start()
            self.stallers.append((scheme, staller))
        if self.debian:
            await self._start_debian()

    def upstreams(self) -> Upstreams:
        honest = (self.sims[0].url, self.sims[1].url, *self.debian_urls)
        chaos = tuple(relay.url(scheme) for scheme, relay in self.chaos)
        refused = (
            f"http://127.0.0.1:{self.refused_ports[0]}",
            f"socks5://127.0.0.1:{self.refused_ports[1]}",
        )
        return Upstreams(
            mixed=(*honest, *chaos, *refused),
            narrow=(self.sims[4].url,),
            dialing=tuple(relay.url(scheme) for scheme, relay in self.stallers),
        )

    def new_counts(self) -> None:
        """Fresh tallies for a run: faults per connection, phases, stalled dials."""
        self.counts, self.phases, self.stalled = Counter(), Counter(), Counter()
        for _, relay in self.chaos:
            relay.counts = self.counts
        for _, relay in self.stallers:
            relay.counts = self.stalled

    async def run_phases(self, seconds: float, rng: random.Random) -> None:
        """Now and then force one relay into one fault kind for 0.5-2 s; all clear at the end."""
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0.5:
                await asyncio.sleep(min(left, rng.uniform(1.0, 2.5)))
                _, relay = rng.choice(self.chaos)
                kind = rng.choice(PHASE_KINDS)
                self.phases[kind] += 1
                if kind == "refuse":
                    await relay.refuse()
                else:
                    relay.force = kind
                hold = min(rng.uniform(0.5, 2.0), max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(hold)
                await self.clear_phases()
        finally:
            await self.clear_phases()

    async def clear_phases(self) -> None:
        for _, relay in self.chaos:
            relay.force = None
            await relay.start()

    async def stop(self) -> None:
        for _, relay in (*self.chaos, *self.stallers):
            await relay.close()
        for sim in self.sims:
            await sim.stop()
        await self.origin.stop()
        for process in self._processes:
            await procs.stop(process)

    async def _start_debian(self) -> None:
        directory = self.workdir / "debian"
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("tinyproxy", "microsocks"):
            program = shutil.which(name)
            if program is None:
                raise RuntimeError(f"{name} is not installed (apt-get install {name})")
            port = procs.free_port()
            if name == "tinyproxy":
                config = directory / "tinyproxy.conf"
                config.write_text(tinyproxy_config("127.0.0.1", port, directory))
                command, scheme = [program, "-d", "-c", str(config)], "http"
            else:
                command, scheme = [program, "-i", "127.0.0.1", "-p", str(port)], "socks5"
            process = procs.spawn(command, directory / f"{name}.out")
            self._processes.append(process)
            if not await procs.wait_listening(process, "127.0.0.1", port, 10.0):
                raise RuntimeError(f"{name} did not start: {procs.tail(directory / f'{name}.out')}")
            self.debian_urls.append(f"{scheme}://127.0.0.1:{port}")


@contextlib.asynccontextmanager
async def running_rig(workdir: Path, rng: random.Random, *, debian: bool) -> AsyncIterator[Rig]:
    rig = Rig(workdir, rng, debian=debian)
    try:
        await rig.start()
        yield rig
    finally:
        await rig.stop()
