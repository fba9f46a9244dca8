"""pytest fixtures over the rig; all function-scoped, all torn down (servers, tasks, processes).

Wiring, either of:

- in the top-level `tests/conftest.py`: `pytest_plugins = ["tests.support.fixtures"]`
  (pytest only honours `pytest_plugins` there);
- in any conftest or test module: `from tests.support.fixtures import *  # noqa: F403`
  (`__all__` lists the fixtures and the factory types to annotate them with).

Fixtures:

- `origin` / `tls_origin`: `Origin` over HTTP / HTTPS on 127.0.0.1 (`tls_material` has the CA).
- `echo_server`: `EchoServer` on 127.0.0.1.
- `egress_addresses`: hands out 127.0.0.11, 127.0.0.12, ... (shared by every factory in a test).
- `fake_http_proxy_factory` / `fake_socks5_proxy_factory`: `await factory(egress=..., auth=...)`
  starts another fake upstream; `fake_http_proxy` / `fake_socks5_proxy`: one of each.
- `microsocks_factory` / `tinyproxy_factory`: `await factory(egress=..., auth=...)` runs another
  Debian proxy (skips, or fails under PROXYGATE_REQUIRE_ALL=1, when it is not installed).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from tests.support.debian_proxies import (
    RunningProxy,
    require_program,
    run_microsocks,
    run_tinyproxy,
)
from tests.support.fake_upstreams import FakeHttpProxy, FakeSocks5Proxy
from tests.support.origin import EchoServer, Origin, TlsMaterial, make_tls_material

__all__ = [
    "DebianProxyFactory",
    "EgressAddresses",
    "FakeHttpProxyFactory",
    "FakeSocks5ProxyFactory",
    "echo_server",
    "egress_addresses",
    "fake_http_proxy",
    "fake_http_proxy_factory",
    "fake_socks5_proxy",
    "fake_socks5_proxy_factory",
    "microsocks_factory",
    "origin",
    "tinyproxy_factory",
    "tls_material",
    "tls_origin",
]


class EgressAddresses:
    """Hands out distinct loopback egress addresses: 127.0.0.11, 127.0.0.12, ..."""

    def __init__(self, first: int = 11) -> None:
        self._next = first

    def __call__(self) -> str:
        if self._next > 254:
            raise RuntimeError("out of 127.0.0.x egress addresses")
        address = f"127.0.0.{self._next}"
        self._next += 1
        return address


P = TypeVar("P", bound=FakeHttpProxy | FakeSocks5Proxy)


class _FakeFactory(Generic[P]):
    def __init__(self, kind: type[P], egress_addresses: EgressAddresses) -> None:
        self._kind: type[P] = kind
        self._egress = egress_addresses
        self.made: list[P] = []

    async def __call__(
        self,
        *,
        egress: str | None = None,
        auth: tuple[str, str] | None = None,
        hosts: dict[str, str] | None = None,
        dial_timeout: float = 5.0,
    ) -> P:
        """Start another fake upstream; `egress` defaults to the next free 127.0.0.x."""
        proxy = self._kind(
            egress=egress or self._egress(), auth=auth, hosts=hosts, dial_timeout=dial_timeout
        )
        self.made.append(proxy)
        await proxy.start()
        return proxy

    async def aclose(self) -> None:
        for proxy in reversed(self.made):
            await proxy.close()


class FakeHttpProxyFactory(_FakeFactory[FakeHttpProxy]):
    """`await factory(egress=None, auth=None, hosts=None, dial_timeout=5.0) -> FakeHttpProxy`."""


class FakeSocks5ProxyFactory(_FakeFactory[FakeSocks5Proxy]):
    """`await factory(egress=None, auth=None, hosts=None, dial_timeout=5.0) -> FakeSocks5Proxy`."""


Runner = Callable[..., AbstractAsyncContextManager[RunningProxy]]


class DebianProxyFactory:
    """`await factory(egress=None, auth=None) -> RunningProxy`; every process stops at teardown."""

    def __init__(self, runner: Runner, egress_addresses: EgressAddresses, workdir: Path) -> None:
        self._runner = runner
        self._egress = egress_addresses
        self._workdir = workdir
        self._stack = contextlib.AsyncExitStack()
        self.made: list[RunningProxy] = []

    async def __call__(
        self, *, egress: str | None = None, auth: tuple[str, str] | None = None
    ) -> RunningProxy:
        workdir = self._workdir / str(len(self.made))
        workdir.mkdir(parents=True)
        proxy = await self._stack.enter_async_context(
            self._runner(egress=egress or self._egress(), auth=auth, workdir=workdir)
        )
        self.made.append(proxy)
        return proxy

    async def aclose(self) -> None:
        await self._stack.aclose()


@pytest.fixture
def egress_addresses() -> EgressAddresses:
    return EgressAddresses()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin("127.0.0.1") as server:
        yield server


@pytest.fixture
def tls_material(tmp_path: Path) -> TlsMaterial:
    return make_tls_material(tmp_path / "tls")


@pytest.fixture
async def tls_origin(tls_material: TlsMaterial) -> AsyncIterator[Origin]:
    async with Origin("127.0.0.1", ssl_context=tls_material.server_context()) as server:
        yield server


@pytest.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    async with EchoServer("127.0.0.1") as server:
        yield server


@pytest.fixture
async def fake_http_proxy_factory(
    egress_addresses: EgressAddresses,
) -> AsyncIterator[FakeHttpProxyFactory]:
    factory = FakeHttpProxyFactory(FakeHttpProxy, egress_addresses)
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def fake_socks5_proxy_factory(
    egress_addresses: EgressAddresses,
) -> AsyncIterator[FakeSocks5ProxyFactory]:
    factory = FakeSocks5ProxyFactory(FakeSocks5Proxy, egress_addresses)
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def fake_http_proxy(fake_http_proxy_factory: FakeHttpProxyFactory) -> FakeHttpProxy:
    return await fake_http_proxy_factory()


@pytest.fixture
async def fake_socks5_proxy(fake_socks5_proxy_factory: FakeSocks5ProxyFactory) -> FakeSocks5Proxy:
    return await fake_socks5_proxy_factory()


@pytest.fixture
async def microsocks_factory(
    egress_addresses: EgressAddresses, tmp_path: Path
) -> AsyncIterator[DebianProxyFactory]:
    require_program("microsocks")
    factory = DebianProxyFactory(run_microsocks, egress_addresses, tmp_path / "microsocks")
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def tinyproxy_factory(
    egress_addresses: EgressAddresses, tmp_path: Path
) -> AsyncIterator[DebianProxyFactory]:
    require_program("tinyproxy")
    factory = DebianProxyFactory(run_tinyproxy, egress_addresses, tmp_path / "tinyproxy")
    try:
        yield factory
    finally:
        await factory.aclose()
