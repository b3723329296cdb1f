"""Connect work in batches (issue 11 benchmarks): the registrar and the connect batch.

On SQLite and PostgreSQL (``db_url``): many handshakes' writes share one transaction, a
banned or removed node is refused without refusing the others, a batch that fails as a
whole is retried one registration at a time, every registration claims the agent's
session at a new epoch; activation moves many nodes in one transaction as
``services.lifecycle`` defines it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from loom.coordinator.config import Settings
from loom.coordinator.connects import Coalescer, activate_many
from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.db.models import AgentSession, Device, Node, NodeEvent
from loom.coordinator.registration import Refused, Registrar
from loom.coordinator.services.nodes import Registration
from loom.coordinator.state import CoordinatorState
from loom.protocol.messages import CLOSE_BANNED, Inventory

INVENTORY = Inventory(cpu_model="test cpu", cpu_cores=2, ram_mb=4096, disk_free_mb=1000)


def _reg(i: int, *, key: str | None = None) -> Registration:
    return Registration(
        node_id=f"node{i:04d}", node_key=key or f"{i:064x}", owner_key="ab" * 32,
        name=f"n{i}", region="eu-west", country="DE", price_micro=300_000, price_auto=False,
        protocol=1, agent_version="test", inventory=INVENTORY,
    )  # fmt: skip


@pytest.fixture
async def state(db_url: str) -> AsyncIterator[CoordinatorState]:
    engine = create_engine(db_url)
    await migrate(engine)
    st = CoordinatorState(
        settings=Settings(db_url=db_url, replica_id="r1"),
        engine=engine,
        sessions=session_factory(engine),
    )
    try:
        yield st
    finally:
        await st.stop_loops()
        await engine.dispose()


async def test_registrations_of_the_moment_share_one_transaction(
    state: CoordinatorState,
) -> None:
    registrar = Registrar(state)
    got = await asyncio.gather(
        *(registrar.register(_reg(i), 100.0, "http://r1") for i in range(30))
    )
    assert all(r.state == "registering" and r.epoch == 1 for r in got)
    # All 30 arrived before the batch task's first step: one transaction for all of them.
    assert registrar.transactions == 1
    again = await asyncio.gather(
        *(registrar.register(_reg(i), 101.0, "http://r1") for i in range(3))
    )
    assert [r.epoch for r in again] == [2, 2, 2]  # a reconnect fences the previous socket
    async with state.session() as session:
        nodes = (await session.execute(select(Node.id, Node.connected_since))).all()
        assert len(nodes) == 30
        assert {at for _id, at in nodes} == {100.0, 101.0}
        cpus = (await session.execute(select(Device.id).where(Device.model == "cpu"))).all()
        assert len(cpus) == 30
        held = (await session.execute(select(AgentSession.node_id, AgentSession.epoch))).all()
        assert sorted(e for n, e in held if n in {"node0000", "node0001", "node0002"}) == [2] * 3


async def test_a_banned_node_is_refused_and_the_others_of_its_batch_connect(
    state: CoordinatorState,
) -> None:
    registrar = Registrar(state)
    await registrar.register(_reg(1), 100.0, "")
    await registrar.register(_reg(2), 100.0, "")
    async with state.session() as session:
        for node_id, to in (("node0001", "banned"), ("node0002", "removed")):
            node = await session.get(Node, node_id)
            assert node is not None
            node.state = to
        await session.commit()
    results = await asyncio.gather(
        *(registrar.register(_reg(i), 200.0, "") for i in (3, 1, 2, 4)), return_exceptions=True
    )
    assert isinstance(results[1], Refused) and results[1].code == CLOSE_BANNED
    assert "banned" in results[1].reason
    assert isinstance(results[2], Refused) and "removed by its owner" in results[2].reason
    assert [getattr(r, "epoch", None) for r in results] == [1, None, None, 1]
    async with state.session() as session:
        banned = await session.get(Node, "node0001")
        assert banned is not None and banned.connected_since == 100.0  # nothing written


async def test_a_batch_that_fails_is_retried_one_registration_at_a_time(
    state: CoordinatorState,
) -> None:
    registrar = Registrar(state)
    await registrar.register(_reg(1), 100.0, "")
    # node 9 claims node 1's key (unique): the whole batch fails, then only node 9 does.
    results = await asyncio.gather(
        registrar.register(_reg(5), 200.0, ""),
        *(registrar.register(r, 200.0, "") for r in (_reg(6), _reg(9, key=f"{1:064x}"), _reg(7))),
        return_exceptions=True,
    )
    assert [type(r).__name__ for r in results[1:]] == ["Registered", "IntegrityError", "Registered"]
    async with state.session() as session:
        ids = set((await session.execute(select(Node.id))).scalars())
    assert ids == {"node0001", "node0005", "node0006", "node0007"}


async def test_activation_moves_many_nodes_in_one_transaction(state: CoordinatorState) -> None:
    registrar = Registrar(state)
    for i in range(4):
        await registrar.register(_reg(i), 100.0, "")
    async with state.session() as session:
        cpu = await session.get(Device, "node0001:cpu")
        back = await session.get(Node, "node0002")
        gone = await session.get(Node, "node0003")
        assert cpu is not None and back is not None and gone is not None
        cpu.state = "verified"  # node 1: verified CPU, nothing claimed → available
        back.state, back.state_changed_at = "offline", 1e12  # just now: stays verified
        gone.state, gone.state_changed_at = "offline", 0.0  # long gone: proves again
        for node_id in ("node0002", "node0003"):
            dev = await session.get(Device, f"{node_id}:cpu")
            assert dev is not None
            dev.state = "verified"
        await session.commit()
    await activate_many(state, ["node0000", "node0001", "node0002", "node0003", "nobody"])
    async with state.session() as session:
        states = dict((await session.execute(select(Node.id, Node.state))).all())
        cpu_states = dict((await session.execute(select(Device.node_id, Device.state))).all())
        events = (await session.execute(select(NodeEvent.node_id, NodeEvent.reason))).all()
    assert states == {
        "node0000": "verifying",
        "node0001": "available",
        "node0002": "available",
        "node0003": "verifying",
    }
    assert cpu_states["node0003"] == "claimed" and cpu_states["node0002"] == "verified"
    assert ("node0000", "registered: hardware challenge") in events
    assert ("node0002", "reconnected") in events


async def test_coalescer_runs_what_arrived_meanwhile_in_one_batch() -> None:
    seen: list[list[str]] = []
    after: list[list[str]] = []
    gate = asyncio.Event()

    async def handler(ids: list[str]) -> None:
        seen.append(ids)
        if len(seen) == 1:
            await gate.wait()  # the first batch is slow: the others pile up
        if "bad" in ids:
            raise RuntimeError("a broken batch is logged, not raised to submitters")

    async def follow(ids: list[str]) -> None:
        after.append(ids)

    co = Coalescer(handler, after=follow, interval_s=0.0)
    first = co.submit("a")
    await asyncio.sleep(0)  # the batch of "a" starts
    rest = [co.submit(n) for n in ("b", "c", "b", "bad")]
    assert not first.done()
    gate.set()
    await first
    await asyncio.gather(*rest)
    await co.idle()
    assert seen == [["a"], ["b", "c", "bad"]]
    assert after == seen
    assert (co.batches, co.items) == (2, 4)
