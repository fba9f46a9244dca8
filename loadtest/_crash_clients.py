"""The crash hunt's clients: plain HTTP (keep-alive and a connection per request), CONNECT
tunnels and SOCKS5 through the gateway, some of them walking away at every phase.

Each client is a loop of actions chosen at random until a deadline; each action is bounded by
`ACTION_TIMEOUT` and closes what it opened. What they saw is tallied in `Tally`; an answer the
gateway gives (502, 503, 504, a SOCKS failure) is a figure, not a failure: the hunt is after
the gateway's process, not its answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loadtest._crash_chaos import reset

__all__ = ["ACTIONS", "Gates", "Tally", "run_clients"]

#: Longest one action may take: beyond every gateway timeout of the hunt (they are 1-2 s).
ACTION_TIMEOUT = 8.0
#: Bodies asked for: small ones answered in one write, larger ones that stream (and can be cut).
_SIZES = (0, 200, 2048, 16384, 131072)
_BIG = 1 << 20

#: What a client does, and how often (weights).
ACTIONS: dict[str, int] = {
    "http_keepalive": 20,
    "http_newconn": 12,
    "connect": 12,
    "socks5": 12,
    "abort_head": 6,
    "abort_lease_wait": 8,
    "abort_dial": 6,
    "abort_body": 6,
    "abort_tunnel": 6,
    "narrow_hold": 4,
}


@dataclass(frozen=True, slots=True)
class Gates:
    """Where the clients go: the gateway's listeners (one per pool) and the origin."""

    mixed: tuple[str, int]
    narrow: tuple[str, int]  # max_concurrency 1: clients queue for a lease
    dialing: tuple[str, int]  # upstreams that never answer: the gateway is dialing
    origin: tuple[str, int]


@dataclass(slots=True)
class Tally:
    requests: int = 0  # plain HTTP answers read whole
    tunnels: int = 0  # CONNECT and SOCKS5 tunnels opened
    statuses: Counter[str] = field(default_factory=Counter)
    aborts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.tunnels += other.tunnels
        self.statuses.update(other.statuses)
        self.aborts.update(other.aborts)
        self.errors.update(other.errors)


class _Refused(Exception):
    """The gateway answered with a failure (a status or SOCKS reply), already tallied."""


async def run_clients(
    gates: Gates, tally: Tally, rng: random.Random, *, clients: int, seconds: float
) -> None:
    """`clients` loops of random actions for `seconds`."""
    deadline = time.monotonic() + seconds
    seeds = [rng.getrandbits(32) for _ in range(clients)]
    await asyncio.gather(*(_loop(gates, tally, random.Random(s), deadline) for s in seeds))


async def _loop(gates: Gates, tally: Tally, rng: random.Random, deadline: float) -> None:
    names, weights = list(ACTIONS), list(ACTIONS.values())
    while time.monotonic() < deadline:
        action = rng.choices(names, weights)[0]
        try:
            async with asyncio.timeout(ACTION_TIMEOUT):
                await _ACTIONS[action](gates, tally, rng)
        except TimeoutError:
            tally.errors["client_timeout"] += 1
        except _Refused:
            pass
        except (ConnectionResetError, BrokenPipeError):
            tally.errors["reset"] += 1
        except (asyncio.IncompleteReadError, EOFError):
            tally.errors["closed"] += 1
        except (OSError, ValueError) as exc:
            tally.errors[type(exc).__name__] += 1
            # Refused: the gateway is gone (the hunt notices within 0.2 s); do not spin meanwhile.
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _connection(
    address: tuple[str, int],
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


def _walk_away(writer: asyncio.StreamWriter, rng: random.Random) -> None:
    """Leave as a client does: an orderly close or a reset."""
    if rng.random() < 0.5:
        reset(writer)
    else:
        writer.close()


def _get(origin: tuple[str, int], path: str, *, absolute: bool, close: bool = False) -> bytes:
    target = f"http://{origin[0]}:{origin[1]}{path}" if absolute else path
    return (
        f"GET {target} HTTP/1.1\r\nHost: {origin[0]}:{origin[1]}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode()


async def _read_response(reader: asyncio.StreamReader, tally: Tally) -> bool:
    """Read one response whole; whether the connection may carry another."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = head[9:12].decode("latin-1")
    tally.statuses[status] += 1
    length = 0
    keep = True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    await reader.readexactly(length)
    tally.requests += 1
    return keep and status == "200"


async def _http_keepalive(gates: Gates, tally: Tally, rng: random.Random) -> None:
    async with _connection(gates.mixed) as (reader, writer):
        for _ in range(rng.randint(1, 6)):
            writer.write(_get(gates.origin, f"/bytes/{rng.choice(_SIZES)}", absolute=True))
            if not await _read_response(reader, tally):
                return


async def _http_newconn(gates: Gates, tally: Tally, rng: random.Random) -> None:
    async with _connection(gates.mixed) as (reader, writer):
        writer.write(_get(gates.origin, f"/bytes/{rng.choice(_SIZES)}", absolute=True, close=True))
        await _read_response(reader, tally)


async def _open_connect(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    origin: tuple[str, int],
    tally: Tally,
) -> None:
    authority = f"{origin[0]}:{origin[1]}"
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = head[9:12].decode("latin-1")
    if status != "200":
        tally.statuses[f"connect_{status}"] += 1
        raise _Refused
    tally.tunnels += 1


def _socks_request(origin: tuple[str, int]) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(origin[0]) + origin[1].to_bytes(2, "big")


async def _open_socks(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    origin: tuple[str, int],
    tally: Tally,
) -> None:
    writer.write(b"\x05\x01\x00")
    choice = await reader.readexactly(2)
    if choice != b"\x05\x00":
        tally.statuses["socks_method_refused"] += 1
        raise _Refused
    writer.write(_socks_request(origin))
    reply = await reader.readexactly(10)  # IPv4 bound address: the gateway's answer
    if reply[1] != 0:
        tally.statuses[f"socks_{reply[1]:02x}"] += 1
        raise _Refused
    tally.tunnels += 1


async def _open_tunnel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    gates: Gates,
    tally: Tally,
    rng: random.Random,
) -> None:
    opener = _open_socks if rng.random() < 0.5 else _open_connect
    await opener(reader, writer, gates.origin, tally)


async def _connect(gates: Gates, tally: Tally, rng: random.Random) -> None:
    async with _connection(gates.mixed) as (reader, writer):
        await _open_connect(reader, writer, gates.origin, tally)
        await _through_tunnel(reader, writer, gates, tally, rng)


async def _socks5(gates: Gates, tally: Tally, rng: random.Random) -> None:
    async with _connection(gates.mixed) as (reader, writer):
        await _open_socks(reader, writer, gates.origin, tally)
        await _through_tunnel(reader, writer, gates, tally, rng)


async def _through_tunnel(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    gates: Gates,
    tally: Tally,
    rng: random.Random,
) -> None:
    for _ in range(rng.randint(1, 3)):
        writer.write(_get(gates.origin, f"/bytes/{rng.choice(_SIZES)}", absolute=False))
        if not await _read_response(reader, tally):
            return
    if rng.random() < 0.3 and writer.can_write_eof():
        writer.write_eof()  # a half-close: the gateway passes it on and the origin closes
        await reader.read()


async def _abort_head(gates: Gates, tally: Tally, rng: random.Random) -> None:
    """Walk away in the middle of the request head (or the SOCKS greeting)."""
    kind = rng.choice(("get", "connect", "socks"))
    if kind == "socks":
        whole = b"\x05\x01\x00" + _socks_request(gates.origin)
    elif kind == "connect":
        whole = b"CONNECT %s:%d HTTP/1.1\r\nHost: x\r\n\r\n" % (
            gates.origin[0].encode(),
            gates.origin[1],
        )
    else:
        whole = _get(gates.origin, "/bytes/200", absolute=True)
    async with _connection(rng.choice((gates.mixed, gates.narrow))) as (_, writer):
        writer.write(whole[: rng.randint(1, len(whole) - 1)])
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        _walk_away(writer, rng)
        tally.aborts["mid_head"] += 1


async def _abort_waiting(
    gate: tuple[str, int], phase: str, gates: Gates, tally: Tally, rng: random.Random
) -> None:
    """Send a whole request to `gate`, then walk away before the answer if it has not come."""
    kind = rng.choice(("get", "connect", "socks"))
    async with _connection(gate) as (reader, writer):
        if kind == "socks":
            writer.write(b"\x05\x01\x00")
            await reader.readexactly(2)
            writer.write(_socks_request(gates.origin))
        elif kind == "connect":
            authority = f"{gates.origin[0]}:{gates.origin[1]}"
            writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        else:
            writer.write(_get(gates.origin, "/bytes/2048", absolute=True))
        try:
            async with asyncio.timeout(rng.uniform(0.02, 0.9)):
                answer = await reader.read(1)
        except TimeoutError:
            _walk_away(writer, rng)
            tally.aborts[phase] += 1
            return
        tally.statuses[f"{phase}_answered" if answer else f"{phase}_closed"] += 1


async def _abort_lease_wait(gates: Gates, tally: Tally, rng: random.Random) -> None:
    await _abort_waiting(gates.narrow, "waiting_for_lease", gates, tally, rng)


async def _abort_dial(gates: Gates, tally: Tally, rng: random.Random) -> None:
    await _abort_waiting(gates.dialing, "while_dialing", gates, tally, rng)


async def _abort_body(gates: Gates, tally: Tally, rng: random.Random) -> None:
    """Walk away with the answer's head read and part of its body."""
    async with _connection(gates.mixed) as (reader, writer):
        writer.write(_get(gates.origin, f"/bytes/{_BIG}", absolute=True))
        head = await reader.readuntil(b"\r\n\r\n")
        tally.statuses[head[9:12].decode("latin-1")] += 1
        if head[9:12] != b"200":
            return
        await reader.read(rng.randint(1, 65536))
        _walk_away(writer, rng)
        tally.aborts["mid_body"] += 1


async def _abort_tunnel(gates: Gates, tally: Tally, rng: random.Random) -> None:
    """Walk away from an open tunnel: before asking, or mid-answer."""
    async with _connection(gates.mixed) as (reader, writer):
        await _open_tunnel(reader, writer, gates, tally, rng)
        if rng.random() < 0.7:
            writer.write(_get(gates.origin, f"/bytes/{_BIG}", absolute=False))
            await reader.read(rng.randint(1, 65536))
        else:
            await asyncio.sleep(rng.uniform(0.0, 0.3))
        _walk_away(writer, rng)
        tally.aborts["mid_tunnel"] += 1


async def _narrow_hold(gates: Gates, tally: Tally, rng: random.Random) -> None:
    """Hold the narrow pool's only lease a while, so that others queue behind it."""
    async with _connection(gates.narrow) as (reader, writer):
        await _open_tunnel(reader, writer, gates, tally, rng)
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        writer.write(_get(gates.origin, "/bytes/200", absolute=False))
        await _read_response(reader, tally)


_ACTIONS = {
    "http_keepalive": _http_keepalive,
    "http_newconn": _http_newconn,
    "connect": _connect,
    "socks5": _socks5,
    "abort_head": _abort_head,
    "abort_lease_wait": _abort_lease_wait,
    "abort_dial": _abort_dial,
    "abort_body": _abort_body,
    "abort_tunnel": _abort_tunnel,
    "narrow_hold": _narrow_hold,
}
