"""SQL storage for the leasing core: PostgreSQL (asyncpg) and SQLite (aiosqlite).

storage = SQLStorage("postgresql://user:pw@host/db")   # or "sqlite:///proxygate.db"
await upgrade(storage.url)                              # `proxygate db upgrade`
await storage.open()
"""

from core.storage.sql.adapter import SchemaOutOfDate, SQLStorage
from core.storage.sql.engine import async_url, is_sql_url
from core.storage.sql.errors import StorageUnavailable
from core.storage.sql.migrate import (
    SchemaStatus,
    head_revision,
    schema_is_current,
    schema_status,
    upgrade,
)

__all__ = [
    "SQLStorage",
    "SchemaOutOfDate",
    "SchemaStatus",
    "StorageUnavailable",
    "async_url",
    "head_revision",
    "is_sql_url",
    "schema_is_current",
    "schema_status",
    "upgrade",
]
