"""A storage of its own for each gateway run of the `storage` scenario.

A run on an SQL storage needs its schema, and must not find the catalog of an earlier run (whose
fleet listened on other ports: dead upstreams in rotation). So each run gets a fresh place:
PostgreSQL a schema of its own in the given database (dropped afterwards), SQLite a new file in
the run's working directory; both migrated as `proxygate db upgrade` would. `memory://` is
used as it is.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

__all__ = ["scratch_storage"]


@asynccontextmanager
async def scratch_storage(url: str, workdir: Path) -> AsyncIterator[str]:
    """The URL a gateway run should use in place of `url`."""
    scheme = url.partition("://")[0].lower()
    if scheme.startswith("sqlite"):
        from core.storage.sql import upgrade

        path = workdir / f"storage-{secrets.token_hex(4)}.db"
        scratch = f"sqlite:///{path}"
        await upgrade(scratch)
        yield scratch
        return
    if not scheme.startswith("postgres"):
        yield url
        return
    async with _postgres_schema(url) as scratch:
        yield scratch


@asynccontextmanager
async def _postgres_schema(url: str) -> AsyncIterator[str]:
    from sqlalchemy import text

    from core.storage.sql import upgrade
    from core.storage.sql.engine import make_engine

    schema = f"loadtest_{secrets.token_hex(4)}"
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in url else "?"
        scratch = f"{url}{separator}options={quote(f'-csearch_path={schema}', safe='')}"
        await upgrade(scratch)
        yield scratch
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()
