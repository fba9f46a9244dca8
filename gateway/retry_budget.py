"""A retry budget per pool (as Envoy's): retries in flight stay under a share of the pool's
active requests, so a failing pool cannot multiply the load its clients put on it."""

from __future__ import annotations

__all__ = ["RetryBudget"]


class RetryBudget:
    __slots__ = ("_active", "_retrying", "denied", "minimum", "peak", "percent")

    def __init__(self, percent: float = 20.0, minimum: int = 3) -> None:
        self.percent = percent
        self.minimum = minimum
        self._active: dict[str, int] = {}
        self._retrying: dict[str, int] = {}
        #: Retries refused since start, and the most retries seen in flight at once.
        self.denied = 0
        self.peak = 0

    def request_started(self, pool: str) -> None:
        self._active[pool] = self._active.get(pool, 0) + 1

    def request_ended(self, pool: str) -> None:
        left = self._active[pool] - 1
        if left:
            self._active[pool] = left
        else:
            del self._active[pool]

    def try_retry(self, pool: str) -> bool:
        """Take a place for one retry (give it back with `retry_ended`); False when the pool's
        budget is spent."""
        retrying = self._retrying.get(pool, 0)
        allowed = max(self.minimum, int(self._active.get(pool, 0) * self.percent / 100.0))
        if retrying >= allowed:
            self.denied += 1
            return False
        self._retrying[pool] = retrying + 1
        self.peak = max(self.peak, retrying + 1)
        return True

    def retry_ended(self, pool: str) -> None:
        left = self._retrying[pool] - 1
        if left:
            self._retrying[pool] = left
        else:
            del self._retrying[pool]

    def active(self, pool: str) -> int:
        return self._active.get(pool, 0)

    def retrying(self, pool: str) -> int:
        return self._retrying.get(pool, 0)
