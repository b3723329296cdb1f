"""Clusters and loops, as an attacker tries them (issue 14 §2), on a real coordinator with
protocol-level fake agents (marked verified: they run no prover):

* three parallel creates of one name: exactly one wins, the others get a clean 409
  (enforced by the database's partial unique index, migration 0006);
* a poisoned row (a cluster whose owner key the ledger cannot pay) never stops the
  settlement loop or a teardown for the others: the error is isolated, recorded on the
  row's timeline and counted in ``loom_loop_item_errors_total{loop=...}``.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select, update

from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.config import Settings
from loom.coordinator.db.models import Cluster, ClusterEvent, Node
from loom.coordinator.services import ledger
from loom.core import ledger as core
from loom.protocol.identity import KeyPair
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread, wait_for

SPEC = {"nodes": 1, "resources": {"cpus": 1}, "duration": "1h"}


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, settle_interval_s=0.3)


@pytest.fixture
def server(fast_settings: Settings) -> Iterator[CoordinatorThread]:
    server = CoordinatorThread(fast_settings).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def agents(server: CoordinatorThread) -> Iterator[FakeAgents]:
    fakes = FakeAgents(server.url)
    try:
        yield fakes
    finally:
        fakes.close()


def add_verified(server: CoordinatorThread, agents: FakeAgents, name: str) -> str:
    node = agents.add(name, cpu_cores=4)

    def state() -> str | None:
        async def read() -> str | None:
            async with server.state.sessions() as session:
                row = await session.get(Node, node.node_id)
                return None if row is None else row.state

        value: str | None = server.run_coro(read())
        return value

    wait_for(lambda: state() == "verifying", 10, "verifying")
    server.run_coro(force_available(server.state.sessions, [node.node_id]))
    return node.node_id


def loop_errors(url: str, loop: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf'^loom_loop_item_errors_total\{{loop="{loop}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_parallel_creates_of_one_name_give_one_cluster(
    server: CoordinatorThread, agents: FakeAgents
) -> None:
    for i in range(3):
        add_verified(server, agents, f"n{i}")
    owner = KeyPair.generate()
    with LoomClient(server.url, owner) as c:
        c.deposit("100")
    outcomes: list[object] = []
    barrier = threading.Barrier(3)

    def create() -> None:
        with LoomClient(server.url, owner) as c:
            barrier.wait()
            try:
                outcomes.append(c.create_cluster({**SPEC, "name": "same"}).id)
            except LoomAPIError as exc:
                outcomes.append((exc.status, exc.code))

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    made = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if not isinstance(o, str)]
    assert len(made) == 1, outcomes
    assert refused == [(409, "cluster_exists")] * 2, outcomes
    with LoomClient(server.url, owner) as c:
        live = [x for x in c.clusters() if x.name == "same"]
        assert [x.id for x in live] == made
        # The name is free again once the cluster ended, and per owner only.
        c.wait_cluster("same", timeout=20)
        c.delete_cluster("same")
        again = c.create_cluster({**SPEC, "name": "same"})
        assert again.id != made[0]
    other = KeyPair.generate()
    with LoomClient(server.url, other) as c:
        c.deposit("100")
        assert c.create_cluster({**SPEC, "name": "same"}).name == "same"


def test_a_poisoned_row_never_stops_settlement_or_teardown_for_others(
    server: CoordinatorThread, agents: FakeAgents
) -> None:
    add_verified(server, agents, "p0")
    add_verified(server, agents, "p1")
    alice, bob = KeyPair.generate(), KeyPair.generate()
    ids: dict[str, str] = {}
    for who, key in (("alice", alice), ("bob", bob)):
        with LoomClient(server.url, key) as c:
            c.deposit("100")
            ids[who] = c.create_cluster({**SPEC, "name": who}).id
            c.wait_cluster(who, timeout=20)
    sessions = server.state.sessions

    async def poison(cluster_id: str, key: str, **values: float) -> None:
        async with sessions() as session:
            await session.execute(
                update(Cluster).where(Cluster.id == cluster_id).values(owner_key=key, **values)
            )
            await session.commit()

    # Both owner keys poisoned (a legacy upper-case spelling the ledger cannot pay) and both
    # clusters past their duration: the reconciler's teardowns still end both (a teardown
    # used to stop there, and `cluster down` was a 500), their escrow kept.
    before_teardown = loop_errors(server.url, "teardown")
    for who, key in (("alice", alice), ("bob", bob)):
        server.run_coro(poison(ids[who], key.public_hex.upper(), expires_at=time.time() - 1))

    async def facts(cluster_id: str) -> tuple[str, int]:
        async with sessions() as session:
            cluster = await session.get(Cluster, cluster_id)
            assert cluster is not None
            return cluster.state, await ledger.balance(session, core.escrow_account(cluster_id))

    def ended(cluster_id: str) -> bool:
        return bool(server.run_coro(facts(cluster_id))[0] == "terminated")

    for who in ("alice", "bob"):
        wait_for(lambda w=who: ended(ids[w]), 20, who)  # type: ignore[misc]
        assert server.run_coro(facts(ids[who]))[1] > 0
    assert loop_errors(server.url, "teardown") >= before_teardown + 2
    # Bob's row is repaired; Alice's stays poisoned. The settlement loop keeps failing on
    # Alice, every tick, and still refunds Bob.
    server.run_coro(poison(ids["bob"], bob.public_hex))
    settled_errors = loop_errors(server.url, "settlement")
    with LoomClient(server.url, bob) as c:
        wait_for(lambda: c.balance().balance == "100", 15, "bob's refund by the loop")
    wait_for(
        lambda: loop_errors(server.url, "settlement") >= settled_errors + 2,
        15,
        "the loop to go on ticking past the poisoned row",
    )
    assert server.run_coro(facts(ids["alice"]))[1] > 0  # never refunded to a bad account

    async def events(cluster_id: str) -> list[str]:
        async with sessions() as session:
            rows = await session.execute(
                select(ClusterEvent.reason).where(ClusterEvent.cluster_id == cluster_id)
            )
            return [str(r) for r in rows.scalars()]

    noted = [e for e in server.run_coro(events(ids["alice"])) if "settlement error" in e]
    assert len(noted) == 1 and "lower-case" in noted[0]  # recorded once, not every tick
    assert httpx.get(f"{server.url}/healthz", timeout=5).json()["status"] == "ok"
