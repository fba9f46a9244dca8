"""Leases lose their foreign key to upstreams.

Every statement that inserts a lease has just locked and counted its upstream row, and an
upstream row is deleted only when no lease counts on it (`active = 0`, under its lock), so the
key could never dangle; checking it again cost each lease a trigger and a row lock on its
upstream: about a fifth of PostgreSQL's time for a batched acquire.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_FOREIGN_KEY = "fk_leases_upstream_key_upstreams"
_ISSUED = sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'leases'")
_KEEP_ISSUED = sa.text("UPDATE sqlite_sequence SET seq = max(seq, :issued) WHERE name = 'leases'")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(_FOREIGN_KEY, "leases", type_="foreignkey")
        return
    with _sqlite_copy() as batch:
        batch.drop_constraint(_FOREIGN_KEY, type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.create_foreign_key(_FOREIGN_KEY, "leases", "upstreams", ["upstream_key"], ["key"])
        return
    with _sqlite_copy() as batch:
        batch.create_foreign_key(_FOREIGN_KEY, "upstreams", ["upstream_key"], ["key"])


@contextmanager
def _sqlite_copy() -> Iterator[BatchOperations]:
    """SQLite changes a constraint by copying the table: the copy must keep AUTOINCREMENT and
    the highest id ever handed out, or a released lease's id could be given again."""
    bind = op.get_bind()
    issued = bind.execute(_ISSUED).scalar()
    with op.batch_alter_table("leases", table_kwargs={"sqlite_autoincrement": True}) as batch:
        yield batch
    if issued is not None:
        bind.execute(_KEEP_ISSUED, {"issued": issued})
