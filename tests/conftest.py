"""Suite-wide settings: optional dependencies skip here, and fail instead when CI demands them."""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

#: Set by CI: a test that would skip for a missing service or program fails instead.
REQUIRE_ALL = os.environ.get("PROXYGATE_REQUIRE_ALL", "") not in ("", "0")


def skip_or_fail(reason: str) -> None:
    """Skip locally when something optional is missing; fail where CI said it must be there."""
    if REQUIRE_ALL:
        pytest.fail(f"{reason} (required because PROXYGATE_REQUIRE_ALL is set)")
    pytest.skip(reason)


# The real-socket rig (origin, echo server, fake and Debian upstream proxies) for every test.
pytest_plugins = ["tests.support.fixtures"]


def pytest_configure(config: pytest.Config) -> None:
    # Every test runs on uvloop, the loop the gateway runs on in production.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
