"""Waiting in tests for something that happens in the background (a write, a sweep, a
release), bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

__all__ = ["eventually"]

#: Seconds `eventually` waits unless told otherwise.
TIMEOUT = 5.0


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = TIMEOUT
) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.01)
