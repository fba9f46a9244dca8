"""What a test needs to send traffic through a gateway: a pool's configuration, and an HTTP
request through a proxy."""

from __future__ import annotations

import io
import json

import aiohttp

__all__ = ["fetch", "pool_toml"]


def pool_toml(*urls: str, name: str = "default", extra: str = "") -> str:
    """A `[[pools]]` table of the configuration: the pool `name` with these upstreams."""
    proxies = ", ".join(json.dumps(url) for url in urls)
    return f'\n[[pools]]\nname = "{name}"\nproxies = [{proxies}]\n{extra}\n'


async def fetch(
    url: str,
    proxy: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | io.BytesIO | None = None,
    session: aiohttp.ClientSession | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request through `proxy`: its status, header fields and body."""
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.request(method, url, proxy=proxy, headers=headers, data=data) as r:
            return r.status, dict(r.headers), await r.read()
    finally:
        if own:
            await session.close()
