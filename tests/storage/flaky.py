"""A storage that can be switched off: while `down`, every call raises StorageUnavailable, as a
SQL storage does while its database is away. What it wraps never sees those calls."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast

from core.errors import StorageUnavailable
from core.storage.interface import Storage

__all__ = ["FlakyStorage", "flaky"]

# Opening and closing are the gateway's business whatever the database does.
_ALWAYS = frozenset({"open", "close"})


class FlakyStorage:
    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.down = False
        #: Calls refused while down, by method name, and all told (what a SQL storage
        #: counts as `contact_losses`).
        self.refused: dict[str, int] = {}
        self.contact_losses = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name in _ALWAYS or not inspect.iscoroutinefunction(attribute):
            return attribute
        return self._guarded(name, attribute)

    def _guarded(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                self.refused[name] = self.refused.get(name, 0) + 1
                self.contact_losses += 1
                raise StorageUnavailable("storage database unavailable: switched off by the test")
            return await method(*args, **kwargs)

        return call


def flaky(inner: Storage) -> tuple[Storage, FlakyStorage]:
    """The wrapper twice: typed as a Storage to hand out, and as itself to switch."""
    wrapper = FlakyStorage(inner)
    return cast(Storage, wrapper), wrapper
