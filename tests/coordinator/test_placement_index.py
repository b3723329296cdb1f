"""The coordinator's long-lived placement index (``coordinator.placement_index``).

Against a real coordinator (uvicorn, real SQLite or PostgreSQL) with protocol-level fake
agents: events keep the index current; a deliberately stale index costs a retry, never a
double allocation; the periodic resync repairs what no event announced; and on a network
of more than 32,767 devices placement and offers work with no query whose argument list
grows with the network.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, cast

import pytest
from sqlalchemy import Table, event, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.db.batching import CHUNK
from loom.coordinator.db.models import Allocation, Device, Node
from loom.coordinator.placement_index import PlacementIndex
from loom.coordinator.services import allocation, market
from loom.coordinator.services import clusters as cluster_service
from loom.core.challenge.capacity import offered_units
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


class Statements:
    """The statements an engine runs meanwhile, and the longest argument list among them
    (SQLAlchemy's ``before_cursor_execute`` hook on the real engine)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.sync_engine
        self.count = 0
        self.max_args = 0

    def _seen(
        self, conn: Any, cursor: Any, stmt: str, params: Any, context: Any, many: bool
    ) -> None:
        self.count += 1
        rows = params if many else [params]
        self.max_args = max([self.max_args, *(len(r or ()) for r in rows)])

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


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


def test_the_reservation_computes_capacity_as_core_does(
    coordinator: CoordinatorThread, agents: FakeAgents
) -> None:
    """The reservation's conditional UPDATE caps by ``offered_units`` in SQL: the same."""
    node_id = add_node(coordinator, agents, "cap", cpu_cores=4)
    table = cast(Table, Device.__table__)
    cases = [(None, None), (0, None), (4, None), (4, 2), (4, 0), (4, 9), (1, -1), (3, 3)]

    async def offered(count: int | None, verified: int | None) -> int:
        async with coordinator.state.sessions() as session:
            await session.execute(
                update(Device)
                .where(Device.id == f"{node_id}:cpu")
                .values(count=count, verified_units=verified)
            )
            got = await session.scalar(
                select(allocation.offered_expr(table)).where(table.c.id == f"{node_id}:cpu")
            )
            await session.rollback()
            return int(got)

    for count, verified in cases:
        assert coordinator.run_coro(offered(count, verified)) == offered_units(count, verified)


class HookedSessions:
    """The coordinator's session factory as an index sees it: sessions opened are counted,
    and a step can be injected before the next opens (after ``skip`` of them)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.opened = 0
        self.skip = 0
        self.hook: Callable[[], Awaitable[None]] | None = None

    def factory(self) -> async_sessionmaker[AsyncSession]:
        return cast("async_sessionmaker[AsyncSession]", self)

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[AsyncSession]:
        self.opened += 1
        if self.hook is not None:
            if self.skip:
                self.skip -= 1
            else:
                hook, self.hook = self.hook, None
                await hook()
        async with self.sessions() as session:
            yield session


def test_placement_reads_nothing_and_an_urgent_change_unlists_at_once(
    coordinator: CoordinatorThread, agents: FakeAgents
) -> None:
    a = add_node(coordinator, agents, "ua", price="0.10", cpu_cores=2)
    b = add_node(coordinator, agents, "ub", price="0.20", cpu_cores=2)
    state = coordinator.state
    # A private index (no bus, no refresh loop): every step below is driven by the test.
    sessions = HookedSessions(state.sessions)
    verified = index_of(coordinator).require_verified
    index = PlacementIndex(sessions.factory(), require_verified=verified)
    coordinator.run_coro(index.load())
    one = requirement_from_spec(parse_spec({"nodes": 1, "resources": {"cpus": 1}}))
    two = requirement_from_spec(parse_spec({"nodes": 2, "resources": {"cpus": 1}}))

    def place(req: Any, n: int, **kw: Any) -> tuple[Any, int]:
        before = sessions.opened  # the index's own reads (the coordinator's loops run too)
        plan = coordinator.run_coro(index.place(req, n, **kw))
        return plan, sessions.opened - before

    plan, queries = place(one, 1)
    assert isinstance(plan, PlacementPlan) and plan.head.node_id == a
    assert queries == 0, "a placement the index can answer reads no database"
    # `a` got cheaper behind the index's back, then its price event arrives: the node is
    # unlisted at once (memory may no longer offer it as it was) until it is re-read.
    sql(coordinator, update(Node).where(Node.id == a).values(price_micro=50_000))
    index.on_event(NodeChanged(node_id=a, cause=ChangeCause.PRICE))
    assert index.index.get(a, "cpu") is None and index.dirty == 1
    plan, queries = place(one, 1)
    assert isinstance(plan, PlacementPlan) and plan.head.node_id == b and queries == 0
    # A request memory cannot place while a node waits unlisted re-reads that node first.
    before = index.refreshed_nodes
    plan, queries = place(two, 2)
    assert isinstance(plan, PlacementPlan) and {m.node_id for m in plan.members} == {a, b}
    assert queries > 0 and index.refreshed_nodes == before + 1
    assert {m.node_id: m.price_micro for m in plan.members}[a] == 50_000
    # An allocation event keeps the node listed (the conditional UPDATE guards it).
    index.on_event(NodeChanged(node_id=b, cause=ChangeCause.ALLOCATION))
    assert index.index.get(b, "cpu") is not None
    plan, queries = place(one, 1, exclude_nodes={a})
    assert isinstance(plan, PlacementPlan) and plan.head.node_id == b and queries == 0


def test_a_resync_never_overwrites_a_newer_re_read(coordinator: CoordinatorThread) -> None:
    state = coordinator.state
    supply = coordinator.run_coro(insert_supply(state.sessions, 40, sizes=(1,), prefix="rs"))
    first = supply.node_ids[0]  # in the resync's first page
    hooked = HookedSessions(state.sessions)
    index = PlacementIndex(hooked.factory(), require_verified=True, presence=None)
    index.page, index.settle_s = 10, 0.0
    coordinator.run_coro(index.load())
    old_price = index.nodes[first].price_micro

    async def change_and_refresh() -> None:  # between the resync's first and second page
        async with state.sessions() as session:
            await session.execute(update(Node).where(Node.id == first).values(price_micro=7))
            await session.commit()
        index.on_event(NodeChanged(node_id=first, cause=ChangeCause.PRICE))
        for _ in range(2):  # read, then read again after the settling delay: clean
            await index.refresh()
        assert index.nodes[first].price_micro == 7 and index.dirty == 0

    hooked.skip, hooked.hook = 1, change_and_refresh
    repaired = coordinator.run_coro(index.resync())
    assert hooked.hook is None, "the change ran while the resync was reading"
    assert old_price != 7 and index.nodes[first].price_micro == 7  # not the older page's row
    assert repaired == 0
    assert coordinator.run_coro(index.resync()) == 0 and index.nodes[first].price_micro == 7


def test_placement_and_offers_beyond_32767_devices(coordinator: CoordinatorThread) -> None:
    """PostgreSQL refuses statements with more than 32,767 arguments; none grows so."""
    state = coordinator.state
    # One GPU per node: more nodes than PostgreSQL accepts arguments in one statement.
    supply = coordinator.run_coro(insert_supply(state.sessions, 33_000, sizes=(1,)), timeout=300)
    assert len(supply.node_ids) > 32_767 and supply.devices > 32_767
    everyone = frozenset(supply.node_ids)
    index = PlacementIndex(state.sessions, require_verified=True, presence=everyone)
    spec = parse_spec({"nodes": 4, "resources": {"gpu": "rtx4090"}})

    async def run() -> tuple[object, object, int, int]:
        await index.load()
        async with state.sessions() as session:
            memory = await cluster_service.placement_for(
                session, spec, 4, connected=everyone, require_verified=True, index=index
            )
            # Without the coordinator's index: one loaded for the call (the same code).
            loaded = await cluster_service.placement_for(
                session, spec, 4, connected=everyone, require_verified=True
            )
            found = await market.search(
                session, "gpu=rtx4090", limit=1000, connected=everyone, index=index
            )
            await index.resync()
            return memory, loaded, len(found), index.index.device_count

    with Statements(state.engine) as seen:
        memory, loaded, n_offers, listed = coordinator.run_coro(run(), timeout=300)
    assert seen.max_args <= CHUNK + 10, f"a statement took {seen.max_args} arguments"
    assert listed == supply.devices
    assert isinstance(memory, PlacementPlan) and isinstance(loaded, PlacementPlan)

    async def truth() -> list[tuple[str, str, int]]:
        async with state.sessions() as session:  # the free rtx4090s, straight from SQL
            rows = await session.execute(
                select(Node.id, Node.region, Node.price_micro)
                .join(Device, Device.node_id == Node.id)
                .where(
                    Device.model == "rtx4090",
                    Device.state == "verified",
                    Device.present.is_(True),
                    Device.allocated_units == 0,
                    Node.state.in_(("available", "allocated")),
                )
            )
            return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    free = coordinator.run_coro(truth(), timeout=120)
    assert n_offers == min(1000, len(free))
    by_region: dict[str, list[int]] = {}
    for _, region, price in free:
        by_region.setdefault(region, []).append(price)
    cheapest = min(sum(sorted(p)[:4]) for p in by_region.values() if len(p) >= 4)
    # The cheapest single-region plan of four, as SQL sees the supply.
    assert memory.hourly_micro == loaded.hourly_micro == cheapest
    assert {m.node_id for m in memory.members} <= {n for n, _, _ in free}
    assert len(memory.regions) == 1
    h200 = requirement_from_spec(parse_spec({"nodes": 1, "resources": {"gpu": "h200"}}))
    assert isinstance(coordinator.run_coro(index.place(h200, 1)), PlacementFailure)
