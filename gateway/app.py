"""The composition root: storage, lease manager, listeners and admin, started and stopped as one.

`Gateway.stop()` drains: listeners stop accepting, open requests and tunnels get up to
`drain_timeout` to finish, the rest are cancelled (every lease is released on the way out).

Storage URLs (`storage.url`): `memory://` (this process only), `sqlite:///path/to/file.db`,
`postgresql://user:password@host[:port]/database` (also `postgres://`, and libpq's
`?options=-csearch_path%3DSCHEMA`). The SQL package, and SQLAlchemy with it, is imported only
for a SQL URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Coroutine
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from config import Settings, redact_url
from core.checks import CheckScheduler
from core.clock import Clock
from core.errors import CatalogError, CoreError, StorageUnavailable
from core.leasing import LeaseManager
from core.models import Upstream
from core.storage.interface import Storage
from core.storage.memory import MemoryStorage
from gateway.admin import build_admin_app
from gateway.channel import AcceptedChannel, Channel
from gateway.checkers import build_checkers, learn_real_ip
from gateway.connection import open_connection
from gateway.context import GatewayContext
from gateway.errors import StartupError

__all__ = ["Gateway", "ListenError", "StartupError", "describe_storage_error", "open_storage"]

log = logging.getLogger("proxygate")


class ListenError(StartupError):
    """A listener cannot bind its address: `proxygate run` exits 2, as for a bad configuration
    (the user has a setting to change, or a process to stop), where other start-up failures
    (the storage) exit 1."""

    def __init__(self, host: str, port: int, what: str, error: OSError) -> None:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # The event loop's own strerror repeats the address: "error while attempting to bind on
        # address ('127.0.0.1', 8900): address already in use". (Name lookups' errors have
        # negative numbers of their own, and their strerror is all there is.)
        if error.errno is not None and error.errno > 0:
            reason = os.strerror(error.errno)
        else:
            reason = error.strerror or str(error)
        super().__init__(f"cannot listen on {address} ({what}): {reason[:1].lower()}{reason[1:]}")


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        storage: Storage | None = None,
        clock: Clock | None = None,
        reuse_port: bool = False,
        serve_admin: bool = True,
    ) -> None:
        """For `proxygate run --workers N`: `reuse_port` listens with SO_REUSEPORT, beside the
        other workers on the same ports; `serve_admin` False leaves the admin listener to
        another worker (its address still counts as the gateway's own, for loop checks)."""
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.storage = storage if storage is not None else open_storage(settings.storage.url)
        self.manager = LeaseManager(self.storage, clock=clock)
        self._reuse_port = reuse_port
        self._serve_admin = serve_admin
        self.listen_addresses: list[tuple[str, int]] = []
        self.admin_address: tuple[str, int] | None = None
        self._servers: list[asyncio.Server] = []
        self._admin: web.AppRunner | None = None
        self._connections: set[asyncio.Task[None]] = set()
        #: Every client connection accepted and not yet closed, with a task or without.
        self._clients: set[Channel] = set()
        #: Set while stopping, once the last client connection closed.
        self._drained: asyncio.Event | None = None
        self._context: GatewayContext | None = None
        self._checks: CheckScheduler | None = None
        self._stopped = asyncio.Event()

    @property
    def context(self) -> GatewayContext:
        assert self._context is not None, "the gateway has not started"
        return self._context

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop(drain_timeout=0)
            raise

    async def _start(self) -> None:
        await self._open_storage()
        await self._load_catalog()
        await self.manager.start()
        for listener in self.settings.all_listeners():
            server = await self._listen(listener.listen.host, listener.listen.port, listener.pool)
            host, port = server.sockets[0].getsockname()[:2]
            self.listen_addresses.append((host, port))
        admin = self.settings.admin
        if admin.listen is not None and self._serve_admin:
            await self._start_admin(admin.listen.host, admin.listen.port, admin.token)
        own = set(self.listen_addresses)
        if self.admin_address is not None:
            own.add(self.admin_address)
        elif admin.listen is not None:
            own.add((admin.listen.host, admin.listen.port))
        self._context = GatewayContext(
            self.settings.gateway,
            self.manager,
            own_addresses=frozenset(own),
        )
        await self._start_checks(self._context)
        for server in self._servers:
            await server.start_serving()
        for host, port in self.listen_addresses:
            log.info("listening on %s:%d", host, port)

    async def _start_admin(self, host: str, port: int, token: str | None) -> None:
        self._admin = web.AppRunner(
            build_admin_app(self.manager, token=token, gateway_stats=self._stats),
            access_log=None,
        )
        await self._admin.setup()
        try:
            await web.TCPSite(self._admin, host, port).start()
        except OSError as exc:
            raise ListenError(host, port, "admin", exc) from None
        bound_host, bound_port = self._admin.addresses[-1][:2]
        self.admin_address = (bound_host, bound_port)

    async def _start_checks(self, context: GatewayContext) -> None:
        checks = self.settings.checks
        if not checks.enabled:
            return
        real_ip = None
        if checks.judge_url is not None:
            real_ip = await learn_real_ip(checks.judge_url, min(checks.timeout, 5.0))
            if real_ip is None:
                log.warning("the judge gave no address of ours: anonymity cannot be told")
        self._checks = CheckScheduler(
            self.manager,
            build_checkers(checks, context.policy, http_tunnels=context.connections.http_tunnels),
            interval=checks.interval,
            concurrency=checks.concurrency,
            real_ip=real_ip,
        )
        await self._checks.start()

    async def _open_storage(self) -> None:
        try:
            await self.storage.open()
        except Exception as error:
            raise self._storage_failed(error) from None

    def _storage_failed(self, error: Exception) -> Exception:
        """A clean StartupError for the database's failures; anything else as it is."""
        url = self.settings.storage.url
        reason = describe_storage_error(error, url)
        if reason is None:
            return error
        return StartupError(f"storage.url {redact_url(url)!r}: {reason}")

    async def _listen(self, host: str, port: int, pool: str | None) -> asyncio.Server:
        loop = self.loop

        def serve(channel: Channel) -> None:
            self.serve(channel, pool)

        try:
            server = await self.loop.create_server(
                lambda: AcceptedChannel(loop, serve, self.closed),
                host,
                port,
                reuse_address=True,
                reuse_port=self._reuse_port or None,
                start_serving=False,
                family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            )
        except OSError as exc:
            what = "proxy" if pool is None else f"listener for pool {pool}"
            raise ListenError(host, port, what, exc) from None
        self._servers.append(server)
        return server

    async def _load_catalog(self) -> None:
        try:
            for pool in self.settings.pools:
                try:
                    await self.storage.add_pool(pool.to_pool())
                except CatalogError:
                    await self.storage.update_pool(pool.to_pool())
                await self._add_upstreams(pool.name, pool.to_upstreams())
        except StorageUnavailable as error:
            raise self._storage_failed(error) from None

    async def _add_upstreams(self, pool: str, upstreams: list[Upstream]) -> None:
        """Add those the storage lacks. Processes sharing the storage and starting together
        may add some meanwhile: then look again (once: nobody adds the same ones twice)."""
        for retry in (False, True):
            known = {u.id for u in await self.storage.list_upstreams(pool)}
            try:
                await self.storage.add_upstreams(u for u in upstreams if u.id not in known)
                return
            except CatalogError:
                if retry:
                    raise

    def _stats(self) -> dict[str, object]:
        return {} if self._context is None else self._context.stats()

    def serve(self, channel: Channel, pool: str | None) -> None:
        if self._context is None:  # accepted during shutdown
            channel.close()
            return
        self._clients.add(channel)
        open_connection(self._context, channel, pool, self._spawn)

    @property
    def open_connections(self) -> int:
        """Client connections accepted and not yet closed."""
        return len(self._clients)

    @property
    def connection_tasks(self) -> int:
        """Client connections a coroutine is serving (the rest are served from callbacks)."""
        return len(self._connections)

    def closed(self, channel: Channel) -> None:
        self._clients.discard(channel)
        if not self._clients and self._drained is not None:
            self._drained.set()

    def _spawn(self, serving: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(serving, name="client-connection")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()

    async def _drain(self, timeout: float) -> None:
        """Wait up to `timeout` for the connections' coroutines to end, then for connections
        served without one to close."""
        deadline = self.loop.time() + timeout
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=timeout)
        self._drained = asyncio.Event()
        if self._clients:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._drained.wait()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let open connections finish for `drain_timeout`, then end them."""
        if drain_timeout is None:
            drain_timeout = self.settings.gateway.drain_timeout
        try:
            await self._stop(drain_timeout)
        finally:
            self._stopped.set()

    async def _stop(self, drain_timeout: float) -> None:
        for server in self._servers:
            server.close()
        if self._context is not None:
            self._context.begin_drain()
        if self._clients or self._connections:
            log.info("draining %d open connections", len(self._clients))
            await self._drain(drain_timeout)
        for task in list(self._connections):
            task.cancel()
        for channel in list(self._clients):
            channel.abort()  # served from callbacks alone, and still busy
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        if self._admin is not None:
            await self._admin.cleanup()
        if self._checks is not None:
            await self._checks.close()
        await self.manager.close()
        await self.storage.close()


def open_storage(url: str) -> Storage:
    """The storage `url` names (see the module's docstring), not yet opened. A URL that cannot
    work is a StartupError naming `storage.url` (password hidden) and the reason."""
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryStorage()
    # Imported here, so that memory storage never loads SQLAlchemy.
    from core.storage.sql import SQLStorage, async_url

    try:
        async_url(url)
    except ValueError as error:
        raise StartupError(f"storage.url {redact_url(url)!r}: {_scrub(str(error), url)}") from None
    return SQLStorage(url)


def describe_storage_error(error: BaseException, url: str) -> str | None:
    """What went wrong with the storage database at `url`, in one line and without its
    password; None when `error` is not about the database (a bug: let it be raised)."""
    if isinstance(error, CoreError):  # SchemaOutOfDate, StorageUnavailable
        text = str(error)
    elif isinstance(error, OSError):
        text = error.strerror or str(error)
    else:
        # Only a SQL storage gets here, so SQLAlchemy is loaded already.
        from sqlalchemy.exc import DBAPIError, SQLAlchemyError

        if isinstance(error, DBAPIError) and error.orig is not None:
            text = str(error.orig) or type(error.orig).__name__
        elif isinstance(error, SQLAlchemyError):
            text = str(error)
        else:
            return None
    return _scrub(text.strip().partition("\n")[0], url)


def _scrub(text: str, url: str) -> str:
    """`text` without the password of `url`, as written or decoded."""
    rest = url.partition("://")[2]
    password = rest.rpartition("@")[0].partition(":")[2] if "@" in rest else ""
    for secret in {password, unquote(password)} - {""}:
        text = text.replace(secret, "***")
    return text
