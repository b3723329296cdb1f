"""The challenger's step promotes `verifying` nodes whose CPU has passed, all at once.

A fleet stuck in `verifying` (agents without a prover, CPUs that failed) is the common
case during a connect storm: the step used to open a session and read two rows per such
node every tick, which showed as ~18 % of the coordinator's CPU at 1,000 agents. It now
promotes only those whose CPU it has just read as verified, in one transaction.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, select, update

from loom.coordinator.challenger import Challenger
from loom.coordinator.config import Settings
from loom.coordinator.db.models import Device, Node
from loom.coordinator.loops.challenger import challenger_step
from support.fakeagent import FakeAgents
from support.servers import CoordinatorThread, wait_for


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.extra["challenge.cpu_class"] = "test"
    # The fake agents never answer a challenge: let it time out at once and not come back.
    settings.extra["challenge.start_timeout_s"] = 0.3
    settings.extra["challenge.error_retry_s"] = 3600.0
    settings.extra["challenge.error_retry_max_s"] = 3600.0
    return settings


def _states(coordinator: CoordinatorThread, ids: list[str]) -> dict[str, str]:
    async def read() -> dict[str, str]:
        async with coordinator.state.session() as session:
            rows = await session.execute(select(Node.id, Node.state).where(Node.id.in_(ids)))
            return {node_id: state for node_id, state in rows.all()}

    return dict(coordinator.run_coro(read()))


async def test_the_step_promotes_every_verified_node_without_a_read_per_node(
    coordinator: CoordinatorThread, fakes: FakeAgents
) -> None:
    ids = [fakes.add(f"n{i}").node_id for i in range(4)]
    challenger = coordinator.app.state.challenger
    assert isinstance(challenger, Challenger)
    # Each node's first challenge has run (and timed out): verifying, not busy.
    await asyncio.to_thread(
        wait_for,
        lambda: (
            all(not challenger.node_busy(n) for n in ids)
            and set(_states(coordinator, ids).values()) == {"verifying"}
        ),
        20,
        "the first challenges to end",
    )

    async def pass_cpus(node_ids: list[str]) -> None:  # as a passed verdict writes it
        async with coordinator.state.session() as session:
            cpus = [f"{n}:cpu" for n in node_ids]
            await session.execute(
                update(Device).where(Device.id.in_(cpus)).values(state="verified")
            )
            await session.commit()

    coordinator.run_coro(pass_cpus(ids[:3]))
    per_row: list[str] = []
    promotions: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM devices" in statement and "WHERE devices.id = " in statement:
            per_row.append(statement)  # a read of one device by id: the old per-node promote
        if "FROM nodes" in statement and "nodes.state = " in statement:
            promotions.append(statement)  # promote_many's read of verifying nodes

    def step() -> dict[str, Any]:
        sync_engine = coordinator.state.engine.sync_engine
        event.listen(sync_engine, "before_cursor_execute", count)
        try:
            return dict(coordinator.run_coro(challenger_step(challenger, rng=lambda: 0.999999)))
        finally:
            event.remove(sync_engine, "before_cursor_execute", count)

    assert step() == {}
    states = _states(coordinator, ids)
    assert [states[n] for n in ids] == ["available", "available", "available", "verifying"]
    assert per_row == []
    assert len(promotions) == 1  # one read for the three, in one transaction
    # The one left has not passed: a step reads nothing more for it.
    promotions.clear()
    assert step() == {}
    assert _states(coordinator, ids)[ids[3]] == "verifying"
    assert per_row == [] and promotions == []
