"""The SQL storage's first schema: pools, upstreams, leases, sessions, holders, health history.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_key = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    if op.get_bind().dialect.supports_sequences:  # the round-robin tick (PostgreSQL)
        op.execute(sa.schema.CreateSequence(sa.Sequence("lease_tick")))
    op.create_table(
        "pools",
        sa.Column("key", _key, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("selector", sa.Text(), nullable=False),
        sa.Column("max_concurrency", sa.BigInteger(), nullable=True),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("retired_leases", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("key", name="pk_pools"),
        sa.UniqueConstraint("name", name="uq_pools_name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "upstreams",
        sa.Column("key", _key, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("scheme", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("username", sa.Text(), nullable=True),
        sa.Column("password", sa.Text(), nullable=True),
        sa.Column("country", sa.Text(), nullable=True),
        sa.Column("city", sa.Text(), nullable=True),
        sa.Column("asn", sa.BigInteger(), nullable=True),
        sa.Column("isp", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("tags", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("max_concurrency", sa.BigInteger(), nullable=True),
        sa.Column("latitude", sa.Float(), nullable=True),
        sa.Column("longitude", sa.Float(), nullable=True),
        sa.Column("lim", sa.BigInteger(), nullable=False),
        sa.Column("active", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("total_leases", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_leased", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("retired", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("failure_streak", sa.Integer(), nullable=False),
        sa.Column("latency_ewma", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("checked_at", sa.Float(), nullable=True),
        sa.Column("ejected_until", sa.Float(), nullable=True),
        sa.Column("times_ejected", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.Float(), nullable=True),
        sa.Column("window_ok", sa.Integer(), nullable=False),
        sa.Column("window_failed", sa.Integer(), nullable=False),
        sa.Column("previous_ok", sa.Integer(), nullable=False),
        sa.Column("previous_failed", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_upstreams"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "uq_upstreams_live_id",
        "upstreams",
        ["id"],
        unique=True,
        postgresql_where=sa.text("NOT retired"),
        sqlite_where=sa.text("NOT retired"),
    )
    op.create_index("ix_upstreams_pool_last_leased", "upstreams", ["pool", "last_leased", "key"])
    op.create_index("ix_upstreams_pool_key", "upstreams", ["pool", "key"])
    op.create_index(
        "ix_upstreams_retired",
        "upstreams",
        ["key"],
        postgresql_where=sa.text("retired"),
        sqlite_where=sa.text("retired"),
    )
    op.create_table(
        "leases",
        sa.Column("id", _key, primary_key=True, autoincrement=True),
        sa.Column("upstream_key", _key, nullable=False),
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("session", sa.Text(), nullable=True),
        sa.Column("bound", sa.Boolean(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("idle_ttl", sa.Float(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("rebound_from", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_leases"),
        sa.ForeignKeyConstraint(
            ["upstream_key"], ["upstreams.key"], name="fk_leases_upstream_key_upstreams"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "uq_leases_bound_session",
        "leases",
        ["pool", "consumer", "session"],
        unique=True,
        postgresql_where=sa.text("bound"),
        sqlite_where=sa.text("bound"),
    )
    op.create_index(
        "ix_leases_expires_at",
        "leases",
        ["expires_at"],
        postgresql_where=sa.text("expires_at IS NOT NULL"),
        sqlite_where=sa.text("expires_at IS NOT NULL"),
    )
    op.create_index("ix_leases_holder", "leases", ["holder"])
    op.create_index("ix_leases_pool", "leases", ["pool"])
    op.create_index("ix_leases_upstream_key", "leases", ["upstream_key"])
    op.create_table(
        "parted_sessions",
        sa.Column("pool", sa.Text(), nullable=False),
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("session", sa.Text(), nullable=False),
        sa.Column("upstream_id", sa.Text(), nullable=False),
        sa.Column("country", sa.Text(), nullable=True),
        sa.Column("until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("pool", "consumer", "session", name="pk_parted_sessions"),
    )
    op.create_table(
        "holders",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_holders"),
    )
    op.create_index("ix_holders_last_seen", "holders", ["last_seen"])
    op.create_table(
        "health_history",
        sa.Column("id", _key, primary_key=True, autoincrement=True),
        sa.Column("upstream_key", _key, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("latency", sa.Float(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_health_history"),
    )
    op.create_index("ix_health_history_upstream_key_id", "health_history", ["upstream_key", "id"])


def downgrade() -> None:
    for table in ("health_history", "holders", "parted_sessions", "leases", "upstreams", "pools"):
        op.drop_table(table)
    if op.get_bind().dialect.supports_sequences:
        op.execute(sa.schema.DropSequence(sa.Sequence("lease_tick")))
