"""Faults of a simulated upstream, in toxiproxy's vocabulary, and schedules of them.

A spec is comma-separated `name[=value]` items, e.g. `latency=200,jitter=50`, `down`,
`timeout=0`:

- `latency=MS`: every piece of data sent back to the client is delayed this long.
- `jitter=MS`: a random spread of +- this much on `latency`.
- `bandwidth=KBPS`: data is sent back at this many KB/s at most.
- `timeout=MS`: accept, swallow everything, answer nothing, close after MS (0: never: a
  blackhole).
- `reset_peer=MS`: reset the connection (RST) this long after accepting it.
- `slow_close=MS`: wait this long before closing the client connection.
- `limit_data=BYTES`: close after sending back this many bytes.
- `down`: do not listen: connecting is refused, open connections are cut.

`clear` (or an empty spec) is no toxic at all. A schedule entry is `AT:UPSTREAMS:SPEC`: at `AT`
seconds into the run, upstreams `UPSTREAMS` (`3`, `0-3`, `1,4,6` or `all`) take `SPEC`,
replacing what they had.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["FaultStep", "ToxicError", "Toxics", "parse_step", "parse_upstreams"]


class ToxicError(ValueError):
    """A toxic spec or schedule entry that does not parse; the message says which part."""


@dataclass(frozen=True, slots=True)
class Toxics:
    latency: float = 0.0  # ms
    jitter: float = 0.0  # ms
    bandwidth: float = 0.0  # KB/s, 0: unlimited
    timeout: float | None = None  # ms, None: off
    reset_peer: float | None = None  # ms, None: off
    slow_close: float = 0.0  # ms
    limit_data: int | None = None  # bytes, None: off
    down: bool = False

    @property
    def shapes(self) -> bool:
        """Whether data sent back must be delayed, paced or cut."""
        return bool(self.latency or self.jitter or self.bandwidth or self.limit_data is not None)

    @property
    def clean(self) -> bool:
        return self == Toxics()

    @classmethod
    def parse(cls, spec: str) -> Toxics:
        values: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, has_value, raw = item.partition("=")
            name = name.strip().replace("-", "_")
            if name == "clear":
                continue
            if name not in names:
                raise ToxicError(f"unknown toxic {name!r} (known: {', '.join(sorted(names))})")
            if name == "down":
                values[name] = True
                continue
            if not has_value:
                raise ToxicError(f"toxic {name!r} needs a value, e.g. {name}=100")
            try:
                number = float(raw)
            except ValueError:
                raise ToxicError(f"toxic {name!r}: {raw!r} is not a number") from None
            if number < 0:
                raise ToxicError(f"toxic {name!r}: {raw!r} is negative")
            values[name] = int(number) if name == "limit_data" else number
        return cls(**values)

    def describe(self) -> str:
        if self.clean:
            return "clear"
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "down":
                if value:
                    parts.append("down")
            elif value is not None and (value or f.name in ("timeout", "reset_peer")):
                parts.append(f"{f.name}={value:g}")
        return ",".join(parts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Toxics:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class FaultStep:
    at: float  # seconds after the load starts
    upstreams: tuple[int, ...]
    toxics: Toxics

    def describe(self) -> str:
        return f"{self.at:g}s upstreams {_ranges(self.upstreams)}: {self.toxics.describe()}"


def parse_upstreams(text: str, count: int) -> tuple[int, ...]:
    """`3`, `0-3`, `1,4,6` or `all`, checked against a fleet of `count`."""
    if text.strip() == "all":
        return tuple(range(count))
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ToxicError(f"{part!r} is not an upstream index or range") from None
        if not 0 <= first <= last < count:
            raise ToxicError(
                f"upstreams {part!r} out of range: the fleet has {count} (0-{count - 1})"
            )
        chosen.update(range(first, last + 1))
    if not chosen:
        raise ToxicError(f"no upstreams in {text!r}")
    return tuple(sorted(chosen))


def parse_step(text: str, count: int) -> FaultStep:
    """`AT:UPSTREAMS:SPEC`, e.g. `2.5:0-1:down`."""
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise ToxicError(f"fault {text!r}: expected AT:UPSTREAMS:SPEC, e.g. 2:0-1:latency=100")
    try:
        at = float(parts[0])
    except ValueError:
        raise ToxicError(f"fault {text!r}: {parts[0]!r} is not a number of seconds") from None
    return FaultStep(at, parse_upstreams(parts[1], count), Toxics.parse(parts[2]))


def _ranges(indices: tuple[int, ...]) -> str:
    out: list[str] = []
    start = prev = indices[0]
    for i in (*indices[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)
