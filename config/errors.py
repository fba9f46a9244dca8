"""The one exception invalid configuration raises."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Invalid configuration: where it came from, which key, and why.

    `str()` is the whole message, meant to be printed as is (no traceback): ``source: key: reason``
    where `source` is a file path (with ":line" for proxies files), "environment variable
    PROXYGATE_X__Y" or "command line --flag". Messages never hold a password or token.
    """

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")
