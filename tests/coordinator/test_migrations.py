"""Migrations upgrade an empty database to head and back down to nothing."""

from __future__ import annotations

from sqlalchemy import inspect

from loom.coordinator.db.engine import create_engine, downgrade, migrate


def _tables(sync_conn: object) -> set[str]:
    return set(inspect(sync_conn).get_table_names()) - {"alembic_version"}


async def test_upgrade_to_head_and_down_to_base(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await migrate(engine)
        async with engine.connect() as conn:
            tables = await conn.run_sync(_tables)
        assert {"accounts", "nodes", "devices", "node_events", "request_nonces"} <= tables
        await migrate(engine)  # idempotent
        await downgrade(engine, "base")
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == set()
        await migrate(engine)
    finally:
        await engine.dispose()
