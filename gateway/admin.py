"""The admin HTTP API (aiohttp): health and per-pool statistics, bearer-token protected."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import asdict

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from core.errors import StorageUnavailable
from core.leasing import LeaseManager

__all__ = ["build_admin_app"]

GatewayStats = Callable[[], Mapping[str, object]]
MANAGER = web.AppKey("manager", LeaseManager)
GATEWAY_STATS: web.AppKey[GatewayStats] = web.AppKey("gateway_stats")


def build_admin_app(
    manager: LeaseManager, *, token: str | None, gateway_stats: GatewayStats | None = None
) -> web.Application:
    """`gateway_stats` adds this process's own figures (kept connections, retry budget) to
    `/api/stats` beside the pools'."""
    middlewares: list[Middleware] = [_bearer_auth(token)] if token else []
    app = web.Application(middlewares=middlewares)
    app[MANAGER] = manager
    app[GATEWAY_STATS] = gateway_stats or dict
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/api/stats", _stats)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    try:
        return await _pool_stats(request)
    except StorageUnavailable:
        return web.json_response({"error": "storage unavailable"}, status=503)


async def _pool_stats(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    pools = {}
    for pool in await manager.pools():
        stats = asdict(await manager.stats(pool.name))
        stats["waiting"] = manager.waiting(pool.name)
        pools[pool.name] = stats
    return web.json_response({"pools": pools, **request.app[GATEWAY_STATS]()})


def _bearer_auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise web.HTTPUnauthorized(
                text="bearer token required\n", headers={"WWW-Authenticate": "Bearer"}
            )
        return await handler(request)

    return check
