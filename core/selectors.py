"""Selector strategies as incremental indexes, so one pick costs the same for 100 or 100,000.

Each index sees every upstream that can be leased now (`Slot.leasable`) and is told when that
changes. Removal is lazy where a structure allows it: a stale entry is dropped when a pick meets
it, which keeps the common acquire/release path to a few constant-time steps.

For filtered requests, `choose` picks among an explicit candidate list with the same policy.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Protocol

from core.models import Selector, Upstream

__all__ = ["Slot", "SlotIndex", "choose", "make_index"]


class Slot:
    """An upstream's live leasing state inside one process's index."""

    __slots__ = ("active", "last_leased", "leasable", "limit", "retired", "seq", "upstream")

    def __init__(self, upstream: Upstream, seq: int, limit: int) -> None:
        self.upstream = upstream
        self.seq = seq  # insertion order: "first" means lowest seq
        self.limit = limit
        self.active = 0
        self.leasable = False
        self.retired = False  # removed from the catalog; kept alive by the leases it still has
        self.last_leased = 0  # a storage-wide tick; lowest is least recently leased


class SlotIndex(Protocol):
    def on_available(self, slot: Slot) -> None:
        """`slot` became leasable."""

    def on_unavailable(self, slot: Slot) -> None:
        """`slot` stopped being leasable (full, ejected or removed)."""

    def on_load(self, slot: Slot) -> None:
        """`slot.active` changed while it stayed leasable."""

    def on_latency(self, slot: Slot) -> None:
        """`slot.upstream.latency_ewma` changed."""

    def pick(self) -> Slot | None:
        """The leasable slot this policy wants next, or None."""


class _FirstAvailable:
    """A min-heap of insertion order; full slots are skipped lazily."""

    __slots__ = ("_heap", "_queued")

    def __init__(self) -> None:
        self._heap: list[tuple[int, Slot]] = []
        self._queued: set[int] = set()

    def on_available(self, slot: Slot) -> None:
        if slot.seq not in self._queued:
            self._queued.add(slot.seq)
            heapq.heappush(self._heap, (slot.seq, slot))

    def on_unavailable(self, slot: Slot) -> None:
        pass

    def on_load(self, slot: Slot) -> None:
        pass

    def on_latency(self, slot: Slot) -> None:
        pass

    def pick(self) -> Slot | None:
        heap = self._heap
        while heap:
            slot = heap[0][1]
            if slot.leasable:
                return slot
            heapq.heappop(heap)
            self._queued.discard(slot.seq)
        return None


class _RoundRobin:
    """A ring: the picked slot goes to the back; slots that stopped being leasable fall out."""

    __slots__ = ("_queued", "_ring")

    def __init__(self) -> None:
        self._ring: deque[Slot] = deque()
        self._queued: set[int] = set()

    def on_available(self, slot: Slot) -> None:
        if slot.seq not in self._queued:
            self._queued.add(slot.seq)
            self._ring.append(slot)

    def on_unavailable(self, slot: Slot) -> None:
        pass

    def on_load(self, slot: Slot) -> None:
        pass

    def on_latency(self, slot: Slot) -> None:
        pass

    def pick(self) -> Slot | None:
        ring = self._ring
        while ring:
            slot = ring.popleft()
            if slot.leasable:
                ring.append(slot)
                return slot
            self._queued.discard(slot.seq)
        return None


class _LeastUsed:
    """Buckets by leases held; within a bucket, the slot that entered it first."""

    __slots__ = ("_bucket_of", "_buckets", "_lowest")

    def __init__(self) -> None:
        self._buckets: dict[int, OrderedDict[int, Slot]] = {}
        self._bucket_of: dict[int, int] = {}
        self._lowest = 0

    def on_available(self, slot: Slot) -> None:
        self._put(slot)

    def on_unavailable(self, slot: Slot) -> None:
        bucket = self._bucket_of.pop(slot.seq, None)
        if bucket is not None:
            del self._buckets[bucket][slot.seq]

    def on_load(self, slot: Slot) -> None:
        self.on_unavailable(slot)
        self._put(slot)

    def on_latency(self, slot: Slot) -> None:
        pass

    def pick(self) -> Slot | None:
        if not self._bucket_of:
            return None
        buckets = self._buckets
        level = self._lowest
        # Terminates: some bucket at or above the lowest mark is non-empty.
        while True:
            bucket = buckets.get(level)
            if bucket:
                self._lowest = level
                return next(iter(bucket.values()))
            level += 1

    def _put(self, slot: Slot) -> None:
        level = slot.active
        bucket = self._buckets.get(level)
        if bucket is None:
            bucket = self._buckets[level] = OrderedDict()
        bucket[slot.seq] = slot
        self._bucket_of[slot.seq] = level
        if level < self._lowest or len(self._bucket_of) == 1:
            self._lowest = level


class _Random:
    """A dense array of leasable slots with swap-remove, for O(1) uniform picks."""

    __slots__ = ("_position", "_rng", "_slots")

    def __init__(self, rng: random.Random) -> None:
        self._slots: list[Slot] = []
        self._position: dict[int, int] = {}
        self._rng = rng

    def on_available(self, slot: Slot) -> None:
        if slot.seq not in self._position:
            self._position[slot.seq] = len(self._slots)
            self._slots.append(slot)

    def on_unavailable(self, slot: Slot) -> None:
        index = self._position.pop(slot.seq, None)
        if index is None:
            return
        last = self._slots.pop()
        if last is not slot:
            self._slots[index] = last
            self._position[last.seq] = index

    def on_load(self, slot: Slot) -> None:
        pass

    def on_latency(self, slot: Slot) -> None:
        pass

    def pick(self) -> Slot | None:
        slots = self._slots
        if not slots:
            return None
        return slots[int(self._rng.random() * len(slots))]


def _latency_key(slot: Slot) -> float:
    # Unmeasured upstreams go first, so every upstream gets measured.
    latency = slot.upstream.latency_ewma
    return -1.0 if latency is None else latency


class _LowestLatency:
    """A min-heap by latency EWMA with versioned entries; stale ones are dropped on pick."""

    __slots__ = ("_heap", "_stamp", "_version")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Slot]] = []
        self._version: dict[int, int] = {}
        self._stamp = 0

    def on_available(self, slot: Slot) -> None:
        self._push(slot)

    def on_unavailable(self, slot: Slot) -> None:
        self._version.pop(slot.seq, None)

    def on_load(self, slot: Slot) -> None:
        pass

    def on_latency(self, slot: Slot) -> None:
        if slot.leasable:
            self._push(slot)

    def pick(self) -> Slot | None:
        heap = self._heap
        version = self._version
        while heap:
            _, seq, stamp, slot = heap[0]
            if version.get(seq) == stamp and slot.leasable:
                return slot
            heapq.heappop(heap)
        return None

    def _push(self, slot: Slot) -> None:
        # One counter for all slots: a slot that leaves and comes back never reuses a stamp.
        self._stamp += 1
        stamp = self._version[slot.seq] = self._stamp
        heapq.heappush(self._heap, (_latency_key(slot), slot.seq, stamp, slot))
        if len(self._heap) > 2 * len(self._version) + 64:
            # Latency updates leave superseded entries behind; rebuild before they pile up.
            self._heap = [entry for entry in self._heap if self._version.get(entry[1]) == entry[2]]
            heapq.heapify(self._heap)


class _Weighted:
    """Weighted random over a Fenwick tree of weights: O(log n) update and pick."""

    __slots__ = ("_rng", "_slot_at", "_slot_of", "_total", "_tree", "_weights")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._weights: list[float] = []
        self._tree: list[float] = [0.0]
        self._total = 0.0
        self._slot_of: dict[int, int] = {}
        self._slot_at: list[Slot] = []

    def on_available(self, slot: Slot) -> None:
        position = self._slot_of.get(slot.seq)
        if position is None:
            position = len(self._weights)
            self._slot_of[slot.seq] = position
            self._slot_at.append(slot)
            self._weights.append(0.0)
            if len(self._weights) >= len(self._tree):
                self._rebuild(capacity=2 * len(self._tree))
        self._set(position, max(slot.upstream.weight, 0.0))

    def on_unavailable(self, slot: Slot) -> None:
        position = self._slot_of.get(slot.seq)
        if position is not None:
            self._set(position, 0.0)

    def on_load(self, slot: Slot) -> None:
        pass

    def on_latency(self, slot: Slot) -> None:
        pass

    def pick(self) -> Slot | None:
        for _ in range(2):
            total = self._total
            if total <= 1e-12:
                return None
            position = self._find(self._rng.random() * total)
            if position < len(self._weights) and self._weights[position] > 0.0:
                return self._slot_at[position]
            # Float drift after many updates: rebuild exact sums and draw again.
            self._rebuild(capacity=len(self._tree))
        return None

    def _set(self, position: int, weight: float) -> None:
        delta = weight - self._weights[position]
        if delta == 0.0:
            return
        self._weights[position] = weight
        self._total += delta
        tree = self._tree
        i = position + 1
        size = len(tree)
        while i < size:
            tree[i] += delta
            i += i & -i

    def _find(self, target: float) -> int:
        """The first position whose running sum exceeds `target`."""
        tree = self._tree
        size = len(tree)
        position = 0
        step = 1 << (size.bit_length() - 1)
        while step:
            nxt = position + step
            if nxt < size and tree[nxt] <= target:
                position = nxt
                target -= tree[nxt]
            step >>= 1
        return position

    def _rebuild(self, capacity: int) -> None:
        tree = [0.0] * max(capacity, len(self._weights) + 1)
        for index, weight in enumerate(self._weights, start=1):
            tree[index] += weight
            parent = index + (index & -index)
            if parent < len(tree):
                tree[parent] += tree[index]
        self._tree = tree
        # Exact again: the running total drifts by float rounding over many updates.
        self._total = math.fsum(self._weights)


def make_index(selector: Selector, rng: random.Random) -> SlotIndex:
    if selector is Selector.ROUND_ROBIN:
        return _RoundRobin()
    if selector is Selector.LEAST_USED:
        return _LeastUsed()
    if selector is Selector.FIRST_AVAILABLE:
        return _FirstAvailable()
    if selector is Selector.RANDOM:
        return _Random(rng)
    if selector is Selector.LOWEST_LATENCY:
        return _LowestLatency()
    return _Weighted(rng)


def choose(selector: Selector, candidates: Sequence[Slot], rng: random.Random) -> Slot | None:
    """The same policies over an explicit list of leasable slots (the filtered path)."""
    if not candidates:
        return None
    if selector is Selector.ROUND_ROBIN:
        return min(candidates, key=lambda s: (s.last_leased, s.seq))
    if selector is Selector.LEAST_USED:
        return min(candidates, key=lambda s: (s.active, s.last_leased, s.seq))
    if selector is Selector.FIRST_AVAILABLE:
        return min(candidates, key=lambda s: s.seq)
    if selector is Selector.RANDOM:
        return candidates[int(rng.random() * len(candidates))]
    if selector is Selector.LOWEST_LATENCY:
        return min(candidates, key=lambda s: (_latency_key(s), s.seq))
    weights = [max(s.upstream.weight, 0.0) for s in candidates]
    if sum(weights) <= 0.0:
        return None
    return rng.choices(candidates, weights=weights)[0]
