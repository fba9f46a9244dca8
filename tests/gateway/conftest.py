"""Gateways started in-process on ephemeral loopback ports, checked for leaked leases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from config import load_settings
from core.clock import Clock
from core.storage.sql import upgrade
from gateway.app import Gateway
from tests.conftest import skip_or_fail
from tests.storage.scratch import POSTGRES_URL, drop_schema, make_schema, postgres_unavailable

StartGateway = Callable[..., Awaitable[Gateway]]


def proxy_url(gateway: Gateway, scheme: str = "http", auth: str = "") -> str:
    host, port = gateway.listen_addresses[0]
    return f"{scheme}://{auth}{host}:{port}"


async def leases_held(gateway: Gateway, *, sessions: bool = False) -> int:
    leases = await gateway.storage.list_leases()
    return sum(1 for lease in leases if sessions or lease.session is None)


@pytest.fixture
async def postgres_schema_url() -> AsyncIterator[str]:
    """A PostgreSQL storage URL on a schema of its own, migrated, dropped after the test (for
    gateway processes started by the test)."""
    if reason := await postgres_unavailable():
        skip_or_fail(reason)
    schema = await make_schema("pggateway")
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    try:
        await upgrade(url)
        yield url
    finally:
        await drop_schema(schema)


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """`await start_gateway(toml)` runs a gateway from a TOML text (listen and admin default
    to ephemeral loopback ports). After the test, no lease outside a session may be held."""
    running: list[Gateway] = []

    async def start(toml: str = "", clock: Clock | None = None, **env: str) -> Gateway:
        text = toml
        if "[gateway]" not in text:
            text = '[gateway]\nlisten = ["127.0.0.1:0"]\n' + text
        if "[admin]" not in text:
            text += '\n[admin]\nlisten = "127.0.0.1:0"\n'
        if "[checks]" not in text:
            # Tests count what reaches their upstreams: active checks run where a test asks.
            text += "\n[checks]\nenabled = false\n"
        path = tmp_path / f"gateway{len(running)}.toml"
        path.write_text(text)
        settings = load_settings(path, env={f"PROXYGATE_{k.upper()}": v for k, v in env.items()})
        gateway = Gateway(settings, clock=clock)
        await gateway.start()
        running.append(gateway)
        return gateway

    yield start
    for gateway in running:
        # Releases run as connections wind down: give them a moment, a long one on a busy
        # machine (this only waits when something is still held).
        for _ in range(1000):
            if await leases_held(gateway) == 0:
                break
            await asyncio.sleep(0.01)
        held = await leases_held(gateway)
        await gateway.stop(drain_timeout=1.0)
        assert held == 0, f"{held} leases left held after the test"
