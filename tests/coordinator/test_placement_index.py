"""The coordinator's long-lived placement index (``coordinator.placement_index``).

Against a real coordinator (uvicorn, real SQLite or PostgreSQL) with protocol-level fake
agents: events keep the index current; a deliberately stale index costs a retry, never a
double allocation; the periodic resync repairs what no event announced; and on a network
of more than 32,767 devices placement and offers work with no query whose argument list
grows with the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, update

from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.db.models import Allocation, Device, Node
from loom.coordinator.placement_index import PlacementIndex
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.services import market
from loom.core.placement import PlacementFailure, PlacementPlan, requirement_from_spec
from loom.core.spec import parse_spec
from loom.protocol.events import ChangeCause, NodeChanged, parse_event
from loom.protocol.identity import KeyPair
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread, wait_for
from support.supply import insert_supply


@pytest.fixture
def agents(coordinator: CoordinatorThread) -> Iterator[FakeAgents]:
    fakes = FakeAgents(coordinator.url)
    try:
        yield fakes
    finally:
        fakes.close()


def index_of(coordinator: CoordinatorThread) -> PlacementIndex:
    index = coordinator.state.placement
    assert index is not None, "the app factory sets up the placement index"
    return index


def node_state(coordinator: CoordinatorThread, node_id: str) -> str | None:
    async def read() -> str | None:
        async with coordinator.state.sessions() as session:
            node = await session.get(Node, node_id)
            return None if node is None else node.state

    result: str | None = coordinator.run_coro(read())
    return result


def add_node(coordinator: CoordinatorThread, agents: FakeAgents, name: str, **kw: Any) -> str:
    node = agents.add(name, **kw)
    wait_for(lambda: node_state(coordinator, node.node_id) == "verifying", 10, "verifying")
    coordinator.run_coro(force_available(coordinator.state.sessions, [node.node_id]))
    return node.node_id


def settle(coordinator: CoordinatorThread) -> PlacementIndex:
    """Apply every pending event now (no settling delay), as the next request would."""
    index = index_of(coordinator)
    index.settle_s = 0.0
    for _ in range(3):
        coordinator.run_coro(index.refresh())
    assert index.dirty == 0
    return index


def sql(coordinator: CoordinatorThread, *statements: Any) -> None:
    """Write behind the index's back: no event is published for these."""

    async def run() -> None:
        async with coordinator.state.sessions() as session:
            for stmt in statements:
                await session.execute(stmt)
            await session.commit()

    coordinator.run_coro(run())


def cpu_units(coordinator: CoordinatorThread, node_id: str) -> tuple[int, int, int]:
    """(allocated units, capacity, allocation rows) of a node's CPU device."""

    async def read() -> tuple[int, int, int]:
        async with coordinator.state.sessions() as session:
            dev = await session.get(Device, f"{node_id}:cpu")
            assert dev is not None
            rows = await session.scalar(
                select(func.count()).select_from(Allocation).where(Allocation.device_id == dev.id)
            )
            return dev.allocated_units, int(dev.count or 0), int(rows or 0)

    result: tuple[int, int, int] = coordinator.run_coro(read())
    return result


@pytest.fixture
def funded(client: LoomClient) -> LoomClient:
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    return client


def test_events_keep_the_index_current(
    coordinator: CoordinatorThread, agents: FakeAgents, funded: LoomClient
) -> None:
    owner = KeyPair.generate()
    node_id = add_node(coordinator, agents, "ev", price="0.30", cpu_cores=4, owner=owner)
    index = settle(coordinator)
    cap = index.index.get(node_id, "cpu")
    assert cap is not None and cap.cpus == 4 and cap.price_micro == 300_000
    # A reservation publishes an allocation event: memory follows without a resync.
    funded.create_cluster({"name": "ev1", "nodes": 1, "resources": {"cpus": 3}})
    index = settle(coordinator)
    cap = index.index.get(node_id, "cpu")
    assert cap is not None and cap.cpus == 1
    # An owner's price change too (PATCH /nodes publishes a price event).
    with LoomClient(coordinator.url, owner) as mine:
        mine.request("PATCH", f"/v1/nodes/{node_id}", json={"price": "0.45"})
    offers = funded.request("GET", "/v1/offers").json()
    assert [o["price"] for o in offers if o["node_id"] == node_id] == ["0.45"]
    # A release gives the cores back; the node's agent leaving drops it from placement.
    funded.delete_cluster("ev1")
    index = settle(coordinator)
    cap = index.index.get(node_id, "cpu")
    assert cap is not None and cap.cpus == 4
    agents.close()
    wait_for(lambda: node_id not in coordinator.state.hub.connections, 10, "agent gone")
    with pytest.raises(LoomAPIError) as info:
        funded.create_cluster({"nodes": 1, "resources": {"cpus": 1}})
    assert info.value.code == "no_capacity"
    assert index.index.get(node_id, "cpu") is None or not index.index.free_ids(node_id, "cpu")
    # The events are typed and survive a JSON round trip (what a NATS bus would carry).
    event = NodeChanged(node_id=node_id, cause=ChangeCause.ALLOCATION)
    assert parse_event(event.model_dump_json()) == event


def test_a_stale_index_costs_a_retry_never_a_double_allocation(
    coordinator: CoordinatorThread, agents: FakeAgents, funded: LoomClient
) -> None:
    cheap = add_node(coordinator, agents, "cheap", price="0.10", cpu_cores=2)
    dear = add_node(coordinator, agents, "dear", price="0.20", cpu_cores=2)
    index = settle(coordinator)
    # Someone takes all of `cheap` behind the index's back: memory still offers it.
    sql(coordinator, update(Device).where(Device.id == f"{cheap}:cpu").values(allocated_units=2))
    assert index.index.free_ids(cheap, "cpu"), "the index must be stale for this test"
    before = index.conflicts
    cluster = funded.create_cluster({"nodes": 1, "resources": {"cpus": 1}})
    assert [m.node_id for m in cluster.members] == [dear]  # placed again after the race
    assert index.conflicts == before + 1
    assert cpu_units(coordinator, cheap) == (2, 2, 0)  # not 3 of 2: no double allocation
    assert cpu_units(coordinator, dear) == (1, 2, 1)
    # Now `dear` too is full behind the index's back: a clear 409, nothing over-allocated.
    sql(coordinator, update(Device).where(Device.id == f"{dear}:cpu").values(allocated_units=2))
    with pytest.raises(LoomAPIError) as info:
        funded.create_cluster({"nodes": 1, "resources": {"cpus": 1}})
    assert info.value.status == 409 and info.value.code == "no_capacity"
    assert cpu_units(coordinator, cheap) == (2, 2, 0)
    assert cpu_units(coordinator, dear) == (2, 2, 1)


def test_the_periodic_resync_repairs_a_missed_event(
    coordinator: CoordinatorThread, agents: FakeAgents, funded: LoomClient
) -> None:
    a = add_node(coordinator, agents, "a", price="0.10", cpu_cores=2)
    b = add_node(coordinator, agents, "b", price="0.20", cpu_cores=2)
    index = settle(coordinator)
    assert "placement-resync" in {t.get_name() for t in coordinator.state.tasks}
    # Two changes no event announced: `a` went offline, `b` got cheaper.
    sql(
        coordinator,
        update(Node).where(Node.id == a).values(state="offline"),
        update(Node).where(Node.id == b).values(price_micro=50_000),
    )

    def offered() -> dict[str, str]:
        found = funded.request("GET", "/v1/offers").json()
        return {o["node_id"]: o["price"] for o in found}

    assert offered() == {a: "0.1", b: "0.2"}  # stale: nothing told the index
    assert coordinator.run_coro(index.resync()) == 2
    assert offered() == {b: "0.05"}
    cluster = funded.create_cluster({"nodes": 1, "resources": {"cpus": 1}})
    assert [m.node_id for m in cluster.members] == [b]
    assert coordinator.run_coro(index.resync()) == 0  # the reservation's event was applied


def test_placement_and_offers_beyond_32767_devices(coordinator: CoordinatorThread) -> None:
    """PostgreSQL refuses statements with more than 32,767 arguments; none grows so."""
    state = coordinator.state
    # One GPU per node: more nodes than PostgreSQL accepts arguments in one statement.
    supply = coordinator.run_coro(insert_supply(state.sessions, 33_000, sizes=(1,)), timeout=300)
    assert len(supply.node_ids) > 32_767 and supply.devices > 32_767
    everyone = frozenset(supply.node_ids)
    index = PlacementIndex(state.sessions, require_verified=True, presence=everyone)
    coordinator.run_coro(index.load(), timeout=300)
    assert index.index.device_count == supply.devices
    spec = parse_spec({"nodes": 4, "resources": {"gpu": "rtx4090"}})

    async def both() -> tuple[object, object, int, int]:
        async with state.sessions() as session:
            memory = await cluster_service.placement_for(
                session, spec, 4, connected=everyone, require_verified=True, index=index
            )
            # The database path (no index) over the whole network, as before this index.
            built = await cluster_service.placement_for(
                session, spec, 4, connected=everyone, require_verified=True
            )
            offers_mem = await market.search(
                session, "gpu=rtx4090", limit=1000, connected=everyone, index=index
            )
            offers_db = await market.search(session, "gpu=rtx4090", limit=1000, connected=everyone)
            return memory, built, len(offers_mem), len(offers_db)

    memory, built, n_mem, n_db = coordinator.run_coro(both(), timeout=300)
    assert isinstance(memory, PlacementPlan) and isinstance(built, PlacementPlan), (memory, built)
    # The same plan from memory as from the database (scores move with the clock, so
    # compare what they depend on less: cost and nodes).
    assert memory.hourly_micro == built.hourly_micro
    assert {m.node_id for m in memory.members} == {m.node_id for m in built.members}
    assert n_mem == n_db > 0
    h200 = requirement_from_spec(parse_spec({"nodes": 1, "resources": {"gpu": "h200"}}))
    assert isinstance(coordinator.run_coro(index.place(h200, 1)), PlacementFailure)
