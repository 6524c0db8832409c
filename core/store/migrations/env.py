"""Alembic environment: runs on the connection the store hands it."""

from __future__ import annotations

from alembic import context

from pkigate.core.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only when alembic is run by hand
    raise SystemExit("run migrations through pkigate (Store.open), not the alembic CLI")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
context.run_migrations()
