"""Clusters through the API with protocol-level fake agents: spec errors, placement
failures, atomic reservation under concurrency, teardown bookkeeping."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.db.models import Node
from loom.protocol.identity import KeyPair
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread, wait_for


@pytest.fixture(autouse=True)
def _funded(client: LoomClient) -> None:
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})


class Fakes:
    """Fake agents whose devices are marked verified (they run no prover)."""

    def __init__(self, coordinator: CoordinatorThread) -> None:
        self.coordinator = coordinator
        self.agents = FakeAgents(coordinator.url)
        self.started = self.agents.started
        self.stopped = self.agents.stopped

    @property
    def on_start(self) -> object:
        return self.agents.on_start

    @on_start.setter
    def on_start(self, fn: object) -> None:
        self.agents.on_start = fn  # type: ignore[assignment]

    def add(self, name: str, **kw: object) -> str:
        node = self.agents.add(name, **kw)  # type: ignore[arg-type]
        # Let the connect hooks settle (they move a new node to `verifying`) first.
        wait_for(lambda: self._state(node.node_id) == "verifying", 10, "verifying")
        self.coordinator.run_coro(force_available(self.coordinator.state.sessions, [node.node_id]))
        return node.node_id

    def _state(self, node_id: str) -> str | None:
        async def read() -> str | None:
            async with self.coordinator.state.sessions() as session:
                node = await session.get(Node, node_id)
                return None if node is None else node.state

        result: str | None = self.coordinator.run_coro(read())
        return result


@pytest.fixture
def fakes(coordinator: CoordinatorThread) -> Iterator[Fakes]:
    agents = Fakes(coordinator)
    try:
        yield agents
    finally:
        agents.agents.close()


def test_cluster_lifecycle_with_fake_agents(client: LoomClient, fakes: Fakes) -> None:
    for i in range(3):
        fakes.add(f"f{i}", price=f"0.3{i}")
    cluster = client.create_cluster({"name": "c1", "nodes": 3, "resources": {"cpus": 1}})
    assert cluster.state == "provisioning"
    assert [m.role for m in cluster.members].count("head") == 1
    assert len({m.node_id for m in cluster.members}) == 3
    running = client.wait_cluster("c1", timeout=20)
    assert running.state == "running"
    assert running.head_address == "127.0.0.2:6379"
    assert running.price_per_hour == "0.93"
    assert [e.to_state for e in running.events] == ["requested", "provisioning", "running"]
    heads = [a for a in fakes.started if a["role"] == "head"]
    assert len(heads) == 1 and all(len(a["token"]) >= 32 for a in fakes.started)
    workers = [a for a in fakes.started if a["role"] == "worker"]
    assert all(a["head_address"] == "127.0.0.2:6379" for a in workers)
    assert {n.state for n in client.nodes()} == {"allocated"}
    down = client.delete_cluster("c1")
    assert down.state == "terminated"
    assert {m.state for m in down.members} == {"released"}
    assert sorted(fakes.stopped) == sorted(m.id for m in down.members)
    assert {n.state for n in client.nodes()} == {"available"}
    assert client.clusters() == []
    assert [c.name for c in client.clusters(all_states=True)] == ["c1"]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"nodes": 0}, "nodes"),
        ({"nodes": 1, "resources": {"gpu": "rtx9999"}}, "resources.gpu"),
        ({"nodes": 1, "colour": "red"}, "colour"),
        ({"nodes": 1, "regions": ["mars"]}, "regions"),
        ({"nodes": 1, "max_price": "-1"}, "max_price"),
        ({"nodes": 1, "duration": "forever"}, "duration"),
    ],
)
def test_invalid_specs_fail_before_anything_is_reserved(
    client: LoomClient, fakes: Fakes, spec: dict[str, object], needle: str
) -> None:
    fakes.add("f0")
    with pytest.raises(LoomAPIError) as info:
        client.create_cluster(spec)
    assert info.value.status == 400 and info.value.code == "invalid_spec"
    assert needle in info.value.message
    assert client.clusters(all_states=True) == []
    assert {n.state for n in client.nodes()} == {"available"}


def test_unplaceable_spec_says_what_binds(client: LoomClient, fakes: Fakes) -> None:
    fakes.add("f0", price="0.5")
    fakes.add("f1", price="0.5")
    with pytest.raises(LoomAPIError) as info:
        client.create_cluster({"nodes": 3, "resources": {"cpus": 1}})
    assert info.value.status == 409 and info.value.code == "no_capacity"
    assert "2 of 3" in info.value.message
    with pytest.raises(LoomAPIError) as info:
        client.create_cluster({"nodes": 1, "resources": {"cpus": 1}, "max_price": "0.3"})
    assert "0.5" in info.value.message or "max_price" in info.value.message
    assert client.clusters(all_states=True) == []


def test_two_users_racing_for_the_last_device(coordinator: CoordinatorThread, fakes: Fakes) -> None:
    fakes.add("only")
    results: list[object] = []

    def create(key: KeyPair) -> None:
        with LoomClient(coordinator.url, key) as c:
            c.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
            try:
                results.append(c.create_cluster({"nodes": 1, "resources": {"cpus": 2}}))
            except LoomAPIError as exc:
                results.append(exc)

    threads = [threading.Thread(target=create, args=(KeyPair.generate(),)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if not isinstance(r, LoomAPIError)]
    losers = [r for r in results if isinstance(r, LoomAPIError)]
    assert len(winners) == 1, results
    assert len(losers) == 5 and all(e.code in ("no_capacity", "busy") for e in losers)


def test_worker_failing_to_start_is_replaced(client: LoomClient, fakes: Fakes) -> None:
    for i in range(4):
        fakes.add(f"f{i}", price=f"0.{i + 1}")
    failed_once: list[str] = []

    def on_start(args: dict[str, object]) -> dict[str, object] | None:
        if args["role"] == "worker" and not failed_once:
            failed_once.append(str(args["member_id"]))
            return None
        return {"gcs_address": "127.0.0.2:6379"}

    fakes.on_start = on_start
    client.create_cluster({"name": "r", "nodes": 3, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("r", timeout=20)
    assert cluster.state == "running"
    states = sorted(m.state for m in cluster.members)
    assert states == ["lost", "ready", "ready", "ready"]
    lost = next(m for m in cluster.members if m.state == "lost")
    assert lost.id == failed_once[0] and "failed to start" in lost.reason


def test_no_replacement_fails_cluster_with_reason(client: LoomClient, fakes: Fakes) -> None:
    for i in range(2):
        fakes.add(f"f{i}")
    fakes.on_start = lambda args: (
        None if args["role"] == "worker" else {"gcs_address": "127.0.0.2:1"}
    )
    client.create_cluster({"name": "x", "nodes": 2, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("x", timeout=20)
    assert cluster.state == "failed"
    assert "no other node fits" in cluster.reason
    wait_for(lambda: {n.state for n in client.nodes()} == {"available"}, 10, "devices freed")


def test_other_users_cannot_see_or_delete_my_cluster(
    coordinator: CoordinatorThread, client: LoomClient, fakes: Fakes
) -> None:
    fakes.add("f0")
    mine = client.create_cluster({"name": "mine", "nodes": 1, "resources": {"cpus": 1}})
    with LoomClient(coordinator.url, KeyPair.generate()) as other:
        with pytest.raises(LoomAPIError) as info:
            other.cluster(mine.id)
        assert info.value.status == 404
        with pytest.raises(LoomAPIError):
            other.delete_cluster(mine.id)
        assert other.clusters(all_states=True) == []


def test_cluster_expires_after_its_duration(client: LoomClient, fakes: Fakes) -> None:
    fakes.add("f0")
    client.create_cluster({"name": "short", "nodes": 1, "resources": {"cpus": 1}, "duration": "3s"})
    assert client.wait_cluster("short", timeout=20).state == "running"
    ended = wait_for(
        lambda: (c := client.cluster("short")).state == "terminated" and c, 30, "expiry"
    )
    assert "duration expired" in [e.reason for e in ended.events]
    assert fakes.stopped == [ended.members[0].id]
    assert {n.state for n in client.nodes()} == {"available"}
