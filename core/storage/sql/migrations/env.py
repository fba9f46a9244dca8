"""Alembic's entry point for the SQL storage's migrations.

Run through `core.storage.sql.migrate`, which hands over an open connection (in
`config.attributes["connection"]`): migrations always run on the caller's connection and
transaction, never on an engine of their own.
"""

from __future__ import annotations

from alembic import context

from core.storage.sql.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run the storage migrations with `proxygate db upgrade` "
        "(core.storage.sql.migrate.upgrade), not with the alembic command line"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters tables by copying them; alembic's batch mode does that.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
