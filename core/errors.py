"""The leasing core's error tree: every failure a caller must tell apart has its own type."""

from __future__ import annotations

__all__ = [
    "CatalogError",
    "CoreError",
    "InvalidUpstreamURL",
    "NoUpstreamAvailable",
    "PoolNotFound",
    "SessionFailed",
    "StorageUnavailable",
    "UpstreamNotFound",
]


class CoreError(Exception):
    """Base of every error raised by `core`."""


class InvalidUpstreamURL(CoreError, ValueError):
    """An upstream URL that cannot be used. The message names the URL, credentials redacted."""


class PoolNotFound(CoreError, LookupError):
    def __init__(self, pool: str) -> None:
        super().__init__(f"unknown pool {pool!r}")
        self.pool = pool


class UpstreamNotFound(CoreError, LookupError):
    def __init__(self, upstream_id: str) -> None:
        super().__init__(f"unknown upstream {upstream_id!r}")
        self.upstream_id = upstream_id


class CatalogError(CoreError, ValueError):
    """A catalog change that would leave the pools inconsistent (duplicate id, pool in use...)."""


class NoUpstreamAvailable(CoreError):
    """No upstream could be leased: none matches, or all were busy until the timeout.

    `waited` tells the two apart for callers that answer differently (an empty pool is a
    configuration problem; a busy one is load).
    """

    def __init__(self, pool: str, *, waited: float, reason: str) -> None:
        super().__init__(f"no upstream available in pool {pool!r}: {reason}")
        self.pool = pool
        self.waited = waited
        self.reason = reason


class SessionFailed(CoreError):
    """A session whose upstream failed, in a pool whose `on_sticky_failure` is `fail`: its
    requests fail until it expires."""

    def __init__(self, pool: str, session: str, upstream_id: str) -> None:
        super().__init__(f"session {session!r} of pool {pool!r} lost its upstream {upstream_id}")
        self.pool = pool
        self.session = session
        self.upstream_id = upstream_id


class StorageUnavailable(CoreError):
    """The storage database is down, restarting or cut off. Nothing was leased; a release or
    renew may or may not have been applied (a sweep settles it). Retrying later is the cure."""
