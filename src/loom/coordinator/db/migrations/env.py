"""Alembic environment: migrations run on a connection handed in by the coordinator."""

from __future__ import annotations

from alembic import context

from loom.coordinator.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - the coordinator always passes one
    raise RuntimeError("run migrations through loom.coordinator.db.engine.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
