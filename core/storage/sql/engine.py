"""Storage URLs to async engines, with each dialect's connection settings.

`postgresql://` (or `postgres://`) runs on asyncpg, `sqlite:///path.db` on aiosqlite. Engines are
made by the adapter's `open()` and the migration functions, never at import.

A PostgreSQL URL may carry libpq's `options` parameter with `-c name=value` settings, as psql
takes it: `postgresql://gw@db/proxygate?options=-csearch_path%3Dfleet_a` keeps the tables in
schema `fleet_a` (which must exist), so several fleets can share one database.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

__all__ = ["async_url", "is_sql_url", "make_engine", "server_settings"]

_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}
#: Seconds a SQLite writer waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT = 30.0


def is_sql_url(url: str) -> bool:
    return url.partition("://")[0].lower() in _DRIVERS


def async_url(url: str | URL) -> URL:
    """The SQLAlchemy URL with the async driver: `postgresql://` -> `postgresql+asyncpg://`."""
    try:
        parsed = make_url(url)
    except (ValueError, ArgumentError):  # their messages may quote the URL, password and all
        raise ValueError(
            "not a valid URL: use postgresql://user:password@host:port/database "
            "or sqlite:///path.db"
        ) from None
    driver = _DRIVERS.get(parsed.drivername.lower())
    if driver is None:
        raise ValueError(
            f"unsupported storage URL scheme {parsed.drivername!r}: "
            "use postgresql://... or sqlite:///path.db"
        )
    if driver.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise ValueError("sqlite storage needs a file: sqlite:///path.db")
    if driver.startswith("postgresql"):
        server_settings(parsed)  # a malformed `options` is refused here, not at first connect
    elif "options" in parsed.query:
        raise ValueError("the options parameter is for postgresql:// URLs")
    return parsed.set(drivername=driver)


def server_settings(url: URL) -> dict[str, str]:
    """The `-c name=value` settings of a PostgreSQL URL's libpq-style `options` parameter.

    Grammar: whitespace-separated `-c name=value`, `-cname=value` or `--name=value`, e.g.
    `options=-c search_path=fleet_a -c statement_timeout=5s` (URL-encoded in the URL).
    """
    text = url.query.get("options", "")
    if not isinstance(text, str):
        raise ValueError("the options parameter may be given once")
    settings: dict[str, str] = {}
    tokens = iter(text.split())
    for token in tokens:
        if token == "-c":
            token = next(tokens, "")
        elif token.startswith(("-c", "--")):
            token = token[2:]
        else:
            token = ""
        name, equals, value = token.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
            raise ValueError("the options parameter takes only -c name=value settings")
        settings[name] = value
    return settings


def make_engine(
    url: str | URL,
    *,
    schema: str | None = None,
    pool_size: int = 16,
    max_overflow: int = 16,
    connect_timeout: float = 5.0,
    command_timeout: float | None = None,
) -> AsyncEngine:
    """An async engine for `url`; `schema` (PostgreSQL only) is put first on the search path
    (over the URL's own). `command_timeout` (PostgreSQL only): seconds a statement may take
    before it fails with TimeoutError (None: no limit, as migrations want)."""
    target = async_url(url)
    if target.drivername.startswith("sqlite"):
        return _sqlite_engine(target)
    connect_args: dict[str, Any] = {"timeout": connect_timeout}
    if command_timeout is not None:
        # A database that stops answering (not one that refuses) would otherwise hold every
        # caller until TCP gives up, minutes later.
        connect_args["command_timeout"] = command_timeout
    settings = server_settings(target)
    if schema is not None:
        settings["search_path"] = schema
    if settings:
        connect_args["server_settings"] = settings
    return create_async_engine(
        target.difference_update_query(["options"]),
        pool_size=pool_size,
        max_overflow=max_overflow,
        connect_args=connect_args,
    )


def _sqlite_engine(target: URL) -> AsyncEngine:
    # One connection per process: SQLite has one writer at a time anyway, and the adapter
    # serialises its transactions on an asyncio lock instead of making threads spin on the
    # file lock. Other processes are waited for by SQLite's busy timeout.
    engine = create_async_engine(
        target,
        poolclass=AsyncAdaptedQueuePool,
        pool_size=1,
        max_overflow=0,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT},
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the driver, so every transaction can be BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Take the write lock up front: a transaction that reads and then writes could
        # otherwise find its snapshot stale at the write and fail instead of waiting.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
