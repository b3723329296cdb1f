"""Agent sessions fence a stale replica (issue 11 §3), on SQLite and PostgreSQL.

Two replicas share one database: the agent connects to r1, then reconnects to r2. Every
write r1 still tries on the agent's behalf (heartbeat flush, last_seen, the offline
transition) must change nothing, and r1 learns it is stale.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.db.models import AgentSession, Node
from loom.coordinator.replicas import sessions
from loom.coordinator.services.heartbeats import HeartbeatBuffer


async def _node(db_url: str, node_id: str) -> None:
    engine = create_engine(db_url)
    await migrate(engine)
    async with session_factory(engine)() as session:
        session.add(
            Node(
                id=node_id, node_key=node_id * 2, owner_key="o" * 64, name=node_id,
                region="eu-west", state="available", state_changed_at=0.0, registered_at=0.0,
                last_heartbeat_at=100.0,
            )
        )  # fmt: skip
        await session.commit()
    await engine.dispose()


async def test_epoch_bumps_on_every_claim_and_fences_the_old_holder(db_url: str) -> None:
    await _node(db_url, "n1")
    engine = create_engine(db_url)
    make = session_factory(engine)
    try:
        async with make() as s:
            e1 = await sessions.claim(s, "n1", "r1", 100.0, "http://r1")
            await s.commit()
        async with make() as s:
            e2 = await sessions.claim(s, "n1", "r2", 101.0, "http://r2")
            await s.commit()
        assert (e1, e2) == (1, 2)
        async with make() as s:
            assert not await sessions.holds(s, "n1", "r1", e1)
            assert await sessions.holds(s, "n1", "r2", e2)
            assert await sessions.stale_among(s, "r1", {"n1": e1}) == {"n1"}
            assert await sessions.stale_among(s, "r2", {"n1": e2}) == set()
            assert not await sessions.touch(s, "n1", "r1", e1, 200.0)  # 0 rows: stale
            assert await sessions.touch(s, "n1", "r2", e2, 150.0)
            await s.commit()
            held = await sessions.holder(s, "n1")
            assert held is not None and (held.replica_id, held.epoch) == ("r2", 2)
            assert held.last_seen == 150.0
    finally:
        await engine.dispose()


async def test_a_stale_replicas_heartbeat_flush_writes_nothing(db_url: str) -> None:
    await _node(db_url, "n1")
    engine = create_engine(db_url)
    make = session_factory(engine)
    try:
        async with make() as s:
            e1 = await sessions.claim(s, "n1", "r1", 100.0)
            await s.commit()
        stale_buffer = HeartbeatBuffer()
        stale_buffer.record("n1", 300.0, '{"stale": true}')
        async with make() as s:
            await sessions.claim(s, "n1", "r2", 101.0)  # the agent moved to r2
            await s.commit()
        async with make() as s:
            await stale_buffer.flush(s, fence=("r1", {"n1": e1}))
        async with make() as s:
            node = (await s.execute(select(Node).where(Node.id == "n1"))).scalar_one()
            assert node.last_heartbeat_at == 100.0 and node.heartbeats == 0
            assert node.load_json != '{"stale": true}'
        fresh = HeartbeatBuffer()
        fresh.record("n1", 310.0, "{}")
        async with make() as s:
            await fresh.flush(s, fence=("r2", {"n1": 2}))
        async with make() as s:
            node = (await s.execute(select(Node).where(Node.id == "n1"))).scalar_one()
            assert node.last_heartbeat_at == 310.0 and node.heartbeats == 1
    finally:
        await engine.dispose()


async def test_claims_race_to_distinct_epochs(db_url: str) -> None:
    """Many replicas claiming at once: every claim gets its own epoch, the last one holds."""
    import asyncio

    await _node(db_url, "n1")
    engine = create_engine(db_url)
    make = session_factory(engine)

    async def one(i: int) -> int:
        async with make() as s:
            epoch = await sessions.claim(s, "n1", f"r{i}", float(i))
            await s.commit()
            return epoch

    try:
        epochs = await asyncio.gather(*(one(i) for i in range(8)))
        assert sorted(epochs) == list(range(1, 9))
        async with make() as s:
            row = (await s.execute(select(AgentSession))).scalar_one()
            assert row.epoch == 8
    finally:
        await engine.dispose()


@pytest.mark.parametrize("epoch", [0, 7])
async def test_no_session_or_wrong_epoch_is_stale(db_url: str, epoch: int) -> None:
    await _node(db_url, "n1")
    engine = create_engine(db_url)
    try:
        async with session_factory(engine)() as s:
            if epoch:
                await sessions.claim(s, "n1", "r1", 1.0)
                await s.commit()
            assert await sessions.stale_among(s, "r1", {"n1": epoch}) == {"n1"}
    finally:
        await engine.dispose()
