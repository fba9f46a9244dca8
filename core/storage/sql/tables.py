"""The SQL storage's schema, as SQLAlchemy Core tables.

The migrations under `migrations/` create exactly this (a test compares the two). Design notes:

- `upstreams.key` is a surrogate, insertion-ordered key: "first available" means lowest key, and
  an upstream removed while leased keeps its row (`retired`) until its last lease is released,
  so its id can be added again at once (the id is unique among live rows only).
- Each upstream row carries its own leasing state: `active` (leases held now), `lim` (the
  effective concurrency limit, its own or its pool's), `total_leases` and `last_leased`, the
  tick of its latest grant. Acquire locks the one row it chooses and bumps it; no pool-wide
  row is written on the hot path, so concurrent acquires only meet when they want the same
  upstream.
- Round robin is "least recently leased first" over `last_leased`, a tick shared by every
  process: one rotation across all of them, without a cursor row that every acquire would
  have to lock through its commit.
- Tags are kept as one delimited string (`\\x1f` around each tag) so that both dialects can
  test membership with a plain substring match.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    Sequence,
    Table,
    Text,
    false,
    text,
)

__all__ = [
    "LEASE_TICK",
    "TAG_SEPARATOR",
    "UNLIMITED",
    "health_history",
    "holders",
    "leases",
    "metadata",
    "parted_sessions",
    "pools",
    "upstreams",
]

#: `lim` of an upstream with no concurrency limit (fits PostgreSQL's bigint and SQLite's int).
UNLIMITED = 2**62
TAG_SEPARATOR = "\x1f"

# BigInteger is a plain INTEGER on SQLite, so that an autoincrementing key is the rowid; the
# tables whose keys are ids or orders say AUTOINCREMENT, so SQLite never reuses a deleted one.
_Key = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: The round-robin tick on PostgreSQL (SQLite, whose writers are serialised, takes max + 1).
LEASE_TICK = Sequence("lease_tick", metadata=metadata)

pools = Table(
    "pools",
    metadata,
    Column("key", _Key, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False, unique=True),
    # What the SQL needs as columns; every other setting of the pool lives in `settings`.
    Column("selector", Text, nullable=False),
    Column("max_concurrency", BigInteger, nullable=True),
    Column("settings", Text, nullable=False),
    # Leases granted on upstreams since deleted, so `total_leases` never goes backwards.
    Column("retired_leases", BigInteger, nullable=False, server_default=text("0")),
    sqlite_autoincrement=True,
)

upstreams = Table(
    "upstreams",
    metadata,
    Column("key", _Key, primary_key=True, autoincrement=True),
    Column("id", Text, nullable=False),
    Column("pool", Text, nullable=False),
    Column("scheme", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("port", Integer, nullable=False),
    Column("username", Text, nullable=True),
    Column("password", Text, nullable=True),
    Column("country", Text, nullable=True),
    Column("city", Text, nullable=True),
    Column("asn", BigInteger, nullable=True),
    Column("isp", Text, nullable=True),
    Column("source", Text, nullable=True),
    Column("tags", Text, nullable=False, server_default=text("''")),
    Column("weight", Float, nullable=False),
    Column("max_concurrency", BigInteger, nullable=True),
    Column("latitude", Float, nullable=True),
    Column("longitude", Float, nullable=True),
    # Leasing state.
    Column("lim", BigInteger, nullable=False),
    Column("active", BigInteger, nullable=False, server_default=text("0")),
    Column("total_leases", BigInteger, nullable=False, server_default=text("0")),
    Column("last_leased", BigInteger, nullable=False, server_default=text("0")),
    Column("retired", Boolean, nullable=False, server_default=false()),
    # Health.
    Column("status", Text, nullable=False),
    Column("failure_streak", Integer, nullable=False),
    Column("latency_ewma", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("checked_at", Float, nullable=True),
    Column("ejected_until", Float, nullable=True),
    Column("times_ejected", Integer, nullable=False),
    Column("window_start", Float, nullable=True),
    Column("window_ok", Integer, nullable=False),
    Column("window_failed", Integer, nullable=False),
    Column("previous_ok", Integer, nullable=False),
    Column("previous_failed", Integer, nullable=False),
    Index(
        "uq_upstreams_live_id",
        "id",
        unique=True,
        postgresql_where=text("NOT retired"),
        sqlite_where=text("NOT retired"),
    ),
    # The selectors' orders, within one pool.
    Index("ix_upstreams_pool_last_leased", "pool", "last_leased", "key"),
    Index("ix_upstreams_pool_key", "pool", "key"),
    Index(
        "ix_upstreams_retired",
        "key",
        postgresql_where=text("retired"),
        sqlite_where=text("retired"),
    ),
    sqlite_autoincrement=True,
)

leases = Table(
    "leases",
    metadata,
    Column("id", _Key, primary_key=True, autoincrement=True),
    # No foreign key: each lease is inserted by the statement that locked and counted its
    # upstream, and an upstream row goes only when nothing counts on it (`migrations/` 0002).
    Column("upstream_key", _Key, nullable=False),
    Column("pool", Text, nullable=False),
    Column("consumer", Text, nullable=False),
    Column("session", Text, nullable=True),
    # The session still maps to this lease (a session parted from a failed upstream keeps
    # its lease held, unbound, until its last user is done with it).
    Column("bound", Boolean, nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("holder", Text, nullable=False),
    Column("idle_ttl", Float, nullable=True),
    Column("uses", Integer, nullable=False),
    Column("rebound_from", Text, nullable=True),
    Index(
        "uq_leases_bound_session",
        "pool",
        "consumer",
        "session",
        unique=True,
        postgresql_where=text("bound"),
        sqlite_where=text("bound"),
    ),
    Index(
        "ix_leases_expires_at",
        "expires_at",
        postgresql_where=text("expires_at IS NOT NULL"),
        sqlite_where=text("expires_at IS NOT NULL"),
    ),
    Index("ix_leases_holder", "holder"),
    Index("ix_leases_pool", "pool"),
    Index("ix_leases_upstream_key", "upstream_key"),
    sqlite_autoincrement=True,
)

#: Sessions that left a failed upstream: until they bind anew, or (failed) until `until`.
parted_sessions = Table(
    "parted_sessions",
    metadata,
    Column("pool", Text, primary_key=True),
    Column("consumer", Text, primary_key=True),
    Column("session", Text, primary_key=True),
    Column("upstream_id", Text, nullable=False),
    Column("country", Text, nullable=True),
    Column("until", Float, nullable=True),
)

#: Lease holders (one per gateway process) and when each was last seen alive.
holders = Table(
    "holders",
    metadata,
    Column("id", Text, primary_key=True),
    Column("last_seen", Float, nullable=False),
    Index("ix_holders_last_seen", "last_seen"),
)

health_history = Table(
    "health_history",
    metadata,
    Column("id", _Key, primary_key=True, autoincrement=True),
    Column("upstream_key", _Key, nullable=False),
    Column("at", Float, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("latency", Float, nullable=True),
    Column("source", Text, nullable=False),
    Column("detail", Text, nullable=True),
    Index("ix_health_history_upstream_key_id", "upstream_key", "id"),
)
