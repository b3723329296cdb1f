"""Migrations upgrade an empty database to head and back down to nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

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


async def test_0006_repairs_legacy_rows_and_enforces_one_live_name(db_url: str) -> None:
    """Rows written before the edge refused them: upper-case keys (one keypair, two
    accounts) and live clusters sharing a name. 0006 repairs both, then the database
    refuses a second live cluster of one name per owner, and frees the name once ended."""
    key = "ab" * 32
    engine = create_engine(db_url)
    try:
        await migrate(engine, "0005")
        async with engine.begin() as conn:
            for account in (key, key.upper(), "cd" * 32, ("ef" * 32).upper()):
                await conn.execute(
                    text("INSERT INTO accounts (key, created_at) VALUES (:k, 0)"), {"k": account}
                )
            for i, (name, state) in enumerate(
                [
                    ("dup", "running"),
                    ("dup", "running"),
                    ("dup", "provisioning"),
                    ("old", "terminated"),
                    ("old", "terminated"),
                ]
            ):
                await conn.execute(
                    text(
                        "INSERT INTO clusters (id, name, owner_key, state, reason, spec_json, "
                        "ray_token, head_address, dashboard_url, client_address, hourly_micro, "
                        "created_at, expires_at, state_changed_at, lease_until, timings_json) "
                        "VALUES (:id, :name, :owner, :state, '', '{}', 't', '', '', '', 0, "
                        ":at, 0, 0, 0, '{}')"
                    ),
                    {
                        "id": f"c-00000000000{i}",
                        "name": name,
                        "owner": key.upper(),
                        "state": state,
                        "at": i,
                    },
                )
        await migrate(engine, "0007")  # the inserts below name 0007's columns
        async with engine.begin() as conn:
            accounts = set((await conn.execute(text("SELECT key FROM accounts"))).scalars())
            assert accounts == {key, "cd" * 32, "ef" * 32}
            rows = (
                await conn.execute(text("SELECT id, name, owner_key FROM clusters ORDER BY id"))
            ).all()
        assert {r[2] for r in rows} == {key}
        names = [r[1] for r in rows]
        assert names[0] == "dup" and names[3:] == ["old", "old"]
        assert names[1] == "dup-000000000001" and names[2] == "dup-000000000002"
        insert = text(
            "INSERT INTO clusters (id, name, owner_key, state, reason, spec_json, ray_token, "
            "head_address, dashboard_url, client_address, hourly_micro, created_at, expires_at, "
            "state_changed_at, lease_until, timings_json) VALUES (:id, :name, :owner, :state, "
            "'', '{}', 't', '', '', '', 0, 9, 0, 0, 0, '{}')"
        )
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(
                    insert, {"id": "c-x1", "name": "dup", "owner": key, "state": "requested"}
                )
        async with engine.begin() as conn:  # ended clusters, and other owners, are free
            await conn.execute(
                insert, {"id": "c-x2", "name": "old", "owner": key, "state": "running"}
            )
            await conn.execute(
                insert, {"id": "c-x3", "name": "dup", "owner": "cd" * 32, "state": "running"}
            )
        await downgrade(engine, "0005")
        async with engine.begin() as conn:  # the index is gone with the downgrade
            await conn.execute(
                insert, {"id": "c-x4", "name": "dup", "owner": key, "state": "running"}
            )
    finally:
        await engine.dispose()


async def test_0008_moves_lease_until_to_lock_columns_and_back(db_url: str) -> None:
    """0008 replaces ``clusters.lease_until`` by the lease columns (an old lease keeps its
    expiry), adds them to devices, creates the role and audit tables; down restores it."""
    key = "ab" * 32
    engine = create_engine(db_url)
    try:
        await migrate(engine, "0007")
        async with engine.begin() as conn:
            for i, lease in enumerate((0.0, 1234.5)):
                await conn.execute(
                    text(
                        "INSERT INTO clusters (id, name, owner_key, state, reason, spec_json, "
                        "ray_token, head_address, dashboard_url, client_address, hourly_micro, "
                        "created_at, expires_at, state_changed_at, lease_until, timings_json) "
                        "VALUES (:id, :name, :owner, 'running', '', '{}', 't', '', '', '', 0, "
                        "0, 0, 0, :lease, '{}')"
                    ),
                    {"id": f"c-{i}", "name": f"n{i}", "owner": key, "lease": lease},
                )
        await migrate(engine)
        async with engine.begin() as conn:
            rows = (
                await conn.execute(
                    text("SELECT id, lock_owner, lock_expires_at FROM clusters ORDER BY id")
                )
            ).all()
            assert [tuple(r) for r in rows] == [("c-0", None, None), ("c-1", "pre-0008", 1234.5)]
            tables = await conn.run_sync(_tables)
            assert {"leases", "lease_audit"} <= tables
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("devices")}
            )
            assert {"lock_owner", "lock_token", "lock_expires_at"} <= columns
            await conn.execute(text("UPDATE clusters SET lock_expires_at = 99.0 WHERE id = 'c-0'"))
        with pytest.raises(IntegrityError):  # 0006's live-name index survived the rebuild
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO clusters (id, name, owner_key, state, reason, spec_json, "
                        "ray_token, head_address, dashboard_url, client_address, hourly_micro, "
                        "created_at, expires_at, state_changed_at, timings_json) VALUES "
                        "('c-9', 'n0', :owner, 'running', '', '{}', 't', '', '', '', 0, 0, 0, "
                        "0, '{}')"
                    ),
                    {"owner": key},
                )
        await downgrade(engine, "0007")
        async with engine.begin() as conn:
            rows = (
                await conn.execute(text("SELECT id, lease_until FROM clusters ORDER BY id"))
            ).all()
            assert [tuple(r) for r in rows] == [("c-0", 99.0), ("c-1", 1234.5)]
            assert not {"leases", "lease_audit"} & await conn.run_sync(_tables)
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO clusters (id, name, owner_key, state, reason, spec_json, "
                        "ray_token, head_address, dashboard_url, client_address, hourly_micro, "
                        "created_at, expires_at, state_changed_at, lease_until, timings_json) "
                        "VALUES ('c-9', 'n1', :owner, 'running', '', '{}', 't', '', '', '', 0, "
                        "0, 0, 0, 0, '{}')"
                    ),
                    {"owner": key},
                )
    finally:
        await engine.dispose()


MIGRATE = """
import asyncio, sys
from loom.coordinator.db.engine import create_engine, migrate
async def main():
    engine = create_engine(sys.argv[1])
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
asyncio.run(main())
"""


def test_replicas_starting_at_once_migrate_a_fresh_database_once(db_url: str) -> None:
    """Three replicas started together on a fresh database: each migrates at start; one
    does the work and the others wait for it, then find the schema at head."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outcomes = [(p.wait(120), p.stderr.read().decode() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in outcomes), [err[-800:] for _, err in outcomes]

    async def versions() -> list[str]:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(text("SELECT version_num FROM alembic_version"))
                return [str(r[0]) for r in rows]
        finally:
            await engine.dispose()

    assert len(asyncio.run(versions())) == 1
