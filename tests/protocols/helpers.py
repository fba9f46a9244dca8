"""Feeding helpers shared by the protocol tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from gateway.protocols import BodyData


class Feedable(Protocol):
    def feed(self, data: bytes) -> Sequence[Any]: ...


def feed_chunks(parser: Feedable, chunks: Iterable[bytes]) -> list[Any]:
    events: list[Any] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the given offsets (any order, duplicates and out-of-range allowed)."""
    bounds = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def merge_body(events: Iterable[Any]) -> list[Any]:
    """Consecutive BodyData merged, so event lists from different splits compare equal."""
    merged: list[Any] = []
    for event in events:
        if isinstance(event, BodyData) and merged and isinstance(merged[-1], BodyData):
            merged[-1] = BodyData(merged[-1].data + event.data)
        elif isinstance(event, BodyData) and not event.data:
            continue
        else:
            merged.append(event)
    return merged
