"""The crash hunt's storages: a fresh place per run, its lease rows, and its outages.

- `memory://`: nothing to make; no outage.
- `sqlite:///FILE`: a new file per run, migrated with `proxygate db upgrade`. Outage: another
  process holds the write lock (`BEGIN EXCLUSIVE`, 0.5-2.5 s at a time). The gateway's writers
  then wait on SQLite's busy timeout (30 s), so requests run into `acquire_timeout` and are
  cancelled mid-statement, and leases given back meanwhile queue: the awaits that suspend are
  the ones the crash needs. (Moving the file away and back does nothing to a process that has
  it open, and root ignores permissions, so neither is an outage here.)
- `postgresql://`: a database of its own per run, created and dropped by the hunt, on a private
  server (`tests/storage/private_postgres.py`, where `initdb` is installed) that is restarted
  mid-run (`pg_ctl stop -m fast|immediate`, down 0.5-2 s, started again); or, without one, on
  the shared server at 127.0.0.1:5432, where the outage is the server ending this database's
  connections (`pg_terminate_backend`) instead of a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Place", "PostgresServer", "make_place"]

SHARED_POSTGRES = "postgresql://postgres@127.0.0.1:5432"


class Place(Protocol):
    """Where one run's gateway keeps its pools."""

    url: str
    db_port: int | None
    restarts: int
    outages: int

    async def lease_rows(self) -> int | None: ...

    async def some_leases(self) -> list[str]: ...

    async def disturb(self, seconds: float, rng: random.Random) -> None: ...

    async def ensure_up(self) -> None: ...

    async def drop(self) -> None: ...


class MemoryPlace:
    def __init__(self) -> None:
        self.url = "memory://"
        self.db_port: int | None = None
        self.restarts = self.outages = 0

    async def lease_rows(self) -> int | None:
        return None

    async def some_leases(self) -> list[str]:
        return []

    async def disturb(self, seconds: float, rng: random.Random) -> None:
        return None

    async def ensure_up(self) -> None:
        return None

    async def drop(self) -> None:
        return None


class SqlitePlace:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db_port: int | None = None
        self.url = f"sqlite:///{path}"
        self.restarts = self.outages = 0

    async def lease_rows(self) -> int | None:
        def count() -> int:
            with contextlib.closing(sqlite3.connect(self.path, timeout=10.0)) as connection:
                row = connection.execute("SELECT count(*) FROM leases").fetchone()
                return int(row[0])

        return await asyncio.to_thread(count)

    async def some_leases(self) -> list[str]:
        def rows() -> list[str]:
            with contextlib.closing(sqlite3.connect(self.path, timeout=10.0)) as connection:
                connection.row_factory = sqlite3.Row
                found = connection.execute("SELECT * FROM leases ORDER BY id LIMIT 3")
                return [str(dict(row)) for row in found]

        return await asyncio.to_thread(rows)

    async def disturb(self, seconds: float, rng: random.Random) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0.5:
            await asyncio.sleep(min(left, rng.uniform(2.0, 4.0)))
            if time.monotonic() >= deadline:
                break
            hold = min(rng.uniform(0.5, 2.5), max(0.1, deadline - time.monotonic()))
            # In a thread: sqlite3 blocks. Bounded: 5 s to get the lock, then `hold`.
            if await asyncio.to_thread(self._hold_lock, hold):
                self.outages += 1

    def _hold_lock(self, hold: float) -> bool:
        try:
            with contextlib.closing(sqlite3.connect(self.path, timeout=5.0)) as connection:
                connection.isolation_level = None
                connection.execute("BEGIN EXCLUSIVE")
                time.sleep(hold)
                connection.execute("ROLLBACK")
        except sqlite3.OperationalError:
            return False  # the gateway held it for 5 s: nothing was locked out by us
        return True

    async def ensure_up(self) -> None:
        return None

    async def drop(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}{suffix}")


class PostgresServer:
    """The server the PostgreSQL runs use: a private one (restartable) or the shared one."""

    def __init__(self, private: Any | None) -> None:
        self.private = private  # tests.storage.private_postgres.PrivatePostgres, started
        self.base = (
            f"postgresql://postgres@127.0.0.1:{private.port}" if private else SHARED_POSTGRES
        )
        self.port = int(self.base.rsplit(":", 1)[1])
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, mode: str) -> tuple[PostgresServer | None, str]:
        """A server for `mode` (`private`, `shared` or `auto`), or None and why not."""
        if mode in ("private", "auto"):
            reason = _private_missing()
            if reason is None:
                from tests.storage.private_postgres import PrivatePostgres

                server = PrivatePostgres()
                await server.__aenter__()
                return cls(server), "a private server (restarted mid-run)"
            if mode == "private":
                return None, f"no private PostgreSQL server: {reason}"
        if await _answers(SHARED_POSTGRES + "/postgres"):
            return cls(None), "the shared server at 127.0.0.1:5432 (no restarts: backends ended)"
        return None, "no PostgreSQL server at 127.0.0.1:5432 and none could be started"

    async def close(self) -> None:
        if self.private is not None:
            await self.private.close()

    async def execute(self, statement: str, *args: object) -> Any:
        import asyncpg

        await self.ensure_up()
        connection = await asyncpg.connect(self.base + "/postgres", timeout=10)
        try:
            return await connection.fetch(statement, *args)
        finally:
            await connection.close()

    async def ensure_up(self) -> None:
        async with self._lock:
            if self.private is not None and not self.private.running:
                await self.private.start()

    async def restart(self, rng: random.Random) -> None:
        async with self._lock:
            assert self.private is not None
            await self.private.stop(rng.choice(("fast", "immediate")))
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await self.private.start()


class PostgresPlace:
    def __init__(self, server: PostgresServer, name: str) -> None:
        self.server = server
        self.name = name
        self.url = f"{server.base}/{name}"
        self.db_port: int | None = server.port
        self.restarts = self.outages = 0

    @classmethod
    async def create(cls, server: PostgresServer, name: str) -> PostgresPlace:
        await server.execute(f'CREATE DATABASE "{name}"')
        return cls(server, name)

    async def lease_rows(self) -> int | None:
        import asyncpg

        await self.server.ensure_up()
        connection = await asyncpg.connect(self.url, timeout=10)
        try:
            value = await connection.fetchval("SELECT count(*) FROM leases")
        finally:
            await connection.close()
        return int(value)

    async def some_leases(self) -> list[str]:
        """The first leases left, for the report: which pool, holder and times."""
        import asyncpg

        connection = await asyncpg.connect(self.url, timeout=10)
        try:
            rows = await connection.fetch("SELECT * FROM leases ORDER BY id LIMIT 3")
        finally:
            await connection.close()
        return [str(dict(row)) for row in rows]

    async def disturb(self, seconds: float, rng: random.Random) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 1.0:
            await asyncio.sleep(min(left, rng.uniform(2.5, 5.0)))
            if deadline - time.monotonic() < 1.0:
                break
            if self.server.private is not None:
                await self.server.restart(rng)
                self.restarts += 1
                self.outages += 1
            else:
                ended = await self.server.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    self.name,
                )
                self.outages += bool(ended)

    async def ensure_up(self) -> None:
        await self.server.ensure_up()

    async def drop(self) -> None:
        with contextlib.suppress(Exception):
            await self.server.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


async def make_place(storage: str, label: str, workdir: Path, pg: PostgresServer | None) -> Place:
    """A fresh place for one run (`label` names it: the file, or the database)."""
    if storage == "memory":
        return MemoryPlace()
    if storage == "sqlite":
        return SqlitePlace(workdir / f"{label}.db")
    assert pg is not None
    return await PostgresPlace.create(pg, label)


def _private_missing() -> str | None:
    try:
        from tests.storage.private_postgres import private_postgres_missing
    except ImportError as exc:  # the hunt run from an installed package, without tests/
        return f"tests/storage/private_postgres.py cannot be imported ({exc})"
    return private_postgres_missing()


async def _answers(url: str) -> bool:
    import asyncpg

    try:
        connection = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True
