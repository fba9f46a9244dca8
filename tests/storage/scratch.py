"""Throwaway SQL storages for tests, each on a database of its own, removed when closed.

SQLite: a file in a fresh temporary directory. PostgreSQL: a schema of its own (`pgtest_...`)
in database `test` on 127.0.0.1:5432, made before the migrations run and dropped on close, so
tests never see each other's rows and never touch anyone else's schema.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from core.storage.sql import SQLStorage, upgrade
from tests.conftest import skip_or_fail

__all__ = [
    "POSTGRES_URL",
    "ScratchPostgres",
    "ScratchSQLite",
    "drop_schema",
    "make_schema",
    "open_scratch_postgres",
    "postgres_unavailable",
]

#: The server the PostgreSQL tests use (trust auth on loopback).
POSTGRES_URL = os.environ.get(
    "PROXYGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
_probe: list[str | None] = []


async def postgres_unavailable() -> str | None:
    """Why the test server cannot be used, or None when it can (asked once per run)."""
    if not _probe:
        try:
            connection = await asyncpg.connect(POSTGRES_URL, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            _probe.append(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
        else:
            await connection.close()
            _probe.append(None)
    return _probe[0]


async def make_schema(prefix: str = "pgtest") -> str:
    name = f"{prefix}_{secrets.token_hex(6)}"
    connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        await connection.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await connection.close()
    return name


async def drop_schema(name: str) -> None:
    connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await connection.close()


class ScratchSQLite(SQLStorage):
    def __init__(self, **settings: Any) -> None:
        self._directory = tempfile.mkdtemp(prefix="proxygate-sqlite-")
        super().__init__(f"sqlite:///{self._directory}/storage.db", **settings)

    async def open(self) -> None:
        await upgrade(self.url)
        await super().open()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)


class ScratchPostgres(SQLStorage):
    def __init__(self, **settings: Any) -> None:
        super().__init__(POSTGRES_URL, **settings)

    async def open(self) -> None:
        self.schema = await make_schema()
        await upgrade(self.url, schema=self.schema)
        await super().open()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self.schema is not None:
                await drop_schema(self.schema)


@asynccontextmanager
async def open_scratch_postgres(**settings: Any) -> AsyncIterator[ScratchPostgres]:
    """An open ScratchPostgres, closed (and its schema dropped) afterwards; the test skips, or
    fails where CI demands PostgreSQL, when the server cannot be used."""
    if reason := await postgres_unavailable():
        skip_or_fail(reason)
    scratch = ScratchPostgres(**settings)
    await scratch.open()
    try:
        yield scratch
    finally:
        await scratch.close()
