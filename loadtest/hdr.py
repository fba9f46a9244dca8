"""A log-linear latency histogram in the manner of HdrHistogram: 3 significant digits, any range.

Values are integers (the harness records nanoseconds). Below 2,048 every value has its own
bucket; above, each power of two is split into 1,024 equal buckets, so a bucket is never wider
than 1/1,024 of the values it holds (0.1%). Buckets live in a sparse dict: recording is one
`bit_length` and one dict update, and histograms from several runs merge by adding counts.
Percentiles report a bucket's highest value, as HdrHistogram does, so they never understate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["Histogram"]

_SUB_BITS = 11
_SUB = 1 << _SUB_BITS  # values below this are exact
_HALF = _SUB >> 1


def bucket_of(value: int) -> int:
    if value < _SUB:
        return value if value > 0 else 0
    shift = value.bit_length() - _SUB_BITS
    return (shift + 1) * _HALF + (value >> shift) - _HALF


def highest_in(bucket: int) -> int:
    """The largest value that falls into `bucket`."""
    if bucket < _SUB:
        return bucket
    shift = bucket // _HALF - 1
    sub = bucket % _HALF + _HALF
    return (sub << shift) + (1 << shift) - 1


class Histogram:
    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int, times: int = 1) -> None:
        bucket = bucket_of(value)
        counts = self.counts
        counts[bucket] = counts.get(bucket, 0) + times
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += times
        self.total += value * times

    def merge(self, other: Histogram) -> None:
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n
        if other.count:
            self.min = other.min if self.count == 0 else min(self.min, other.min)
            self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, percent: float) -> int:
        """The value at `percent` (0-100); 0 for an empty histogram."""
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(self.count * percent / 100.0))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(highest_in(bucket), self.max)
        return self.max

    def percentiles(self, percents: Iterable[float]) -> dict[str, int]:
        return {_label(p): self.percentile(p) for p in percents}

    def to_json(self) -> dict[str, object]:
        return {
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "total": self.total,
            "buckets": {str(b): n for b, n in sorted(self.counts.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Histogram:
        hist = cls()
        buckets = data.get("buckets", {})
        assert isinstance(buckets, Mapping)
        hist.counts = {int(b): int(n) for b, n in buckets.items()}
        hist.count = int(str(data.get("count", 0)))
        hist.total = int(str(data.get("total", 0)))
        hist.min = int(str(data.get("min", 0)))
        hist.max = int(str(data.get("max", 0)))
        return hist


def _label(percent: float) -> str:
    """Labels such as p50, p99 and p99.9."""
    return f"p{percent:g}"
