"""When Loom declares a worker lost, the head member's agent is told which Ray node died
(``member.peer_lost``), with protocol-level fake agents and a real coordinator."""

from __future__ import annotations

import itertools
from typing import Any

from loom.client.sdk import LoomClient
from loom.coordinator import ray_peers
from loom.coordinator.loops.cluster_events import member_lost
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread, wait_for

_serial = itertools.count()


def _ray_id(member_id: str) -> str:
    return (member_id.encode().hex() + "0" * 56)[:56]


def _start(args: dict[str, Any]) -> dict[str, Any]:
    member_id = str(args["member_id"])
    return {"gcs_address": "127.0.0.2:6379", "ray_node_id": _ray_id(member_id)}


def _running(client: LoomClient, coordinator: CoordinatorThread, fakes: FakeAgents, n: int) -> Any:
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    nodes = [fakes.add(f"p{next(_serial)}", price=f"0.{i + 1}") for i in range(n)]
    coordinator.run_coro(force_available(coordinator.state.sessions, [x.node_id for x in nodes]))
    fakes.on_start = _start
    client.create_cluster({"name": "peers", "nodes": n, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("peers", timeout=30)
    assert cluster.state == "running", cluster.reason
    return cluster


def _told(fakes: FakeAgents) -> list[tuple[str, dict[str, Any]]]:
    return [(node, args) for node, name, args in fakes.received if name == "member.peer_lost"]


def test_a_lost_worker_is_reported_to_the_heads_agent(
    client: LoomClient, coordinator: CoordinatorThread, fakes: FakeAgents
) -> None:
    cluster = _running(client, coordinator, fakes, 3)
    head = next(m for m in cluster.members if m.role == "head")
    worker = next(m for m in cluster.members if m.role == "worker")
    before = sum(ray_peers.TOLD.values())
    coordinator.run_coro(member_lost(coordinator.state, worker.id, "its host was cut off"))
    told = wait_for(lambda: _told(fakes), 10, "member.peer_lost to the head's agent")
    assert len(told) == 1
    node_id, args = told[0]
    assert node_id == head.node_id  # to the head's agent, about the lost worker's Ray node
    assert args["member_id"] == head.id
    assert args["ray_node_id"] == _ray_id(worker.id)
    assert worker.id in args["reason"] and "cut off" in args["reason"]
    wait_for(lambda: sum(ray_peers.TOLD.values()) > before, 10, "the outcome counted")
    # Declared lost again (a late report): nothing more is sent.
    coordinator.run_coro(member_lost(coordinator.state, worker.id, "again"))
    assert len(_told(fakes)) == 1


def test_a_lost_head_tells_nobody(
    client: LoomClient, coordinator: CoordinatorThread, fakes: FakeAgents
) -> None:
    cluster = _running(client, coordinator, fakes, 2)
    head = next(m for m in cluster.members if m.role == "head")
    before = ray_peers.TOLD["head_lost"]
    coordinator.run_coro(member_lost(coordinator.state, head.id, "gone"))
    wait_for(lambda: ray_peers.TOLD["head_lost"] > before, 10, "the head's loss noted")
    assert _told(fakes) == []
