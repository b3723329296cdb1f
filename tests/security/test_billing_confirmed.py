"""Paying only for work done (issue 14 §3): a member is billed only while someone other
than its own agent confirms it.

One real coordinator, two real agents (real Ray in bubblewrap) and one lying agent that
acks ``member.start`` as ready without starting anything:

* a two-member cluster on the real agents: each agent's view of the head's GCS confirms
  the other member, both are billed and their suppliers paid;

* a one-member cluster on the liar: the coordinator's probe of its "head" fails, so the
  user is charged nothing and the liar's owner earns nothing;
* a two-member cluster, head on the real agent, worker on the liar: the head's GCS does
  not list the liar's node, so the worker is never confirmed (no credit), while the real
  head is confirmed by the coordinator's probe through its tunnel and billed as before.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.client.sdk import LoomClient
from loom.coordinator.config import Settings
from loom.coordinator.confirmation import confirm_cluster
from loom.coordinator.loops.settlement import run_settlement
from loom.protocol.identity import KeyPair
from support.fakeagent import FakeAgents, force_available
from support.servers import AgentProcess, CoordinatorThread, stop_agents, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="bubblewrap not installed (make sysdeps)"
    ),
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.settle_interval_s = 3600.0  # settle by hand, at known moments
    return settings


@pytest.fixture
def liar(coordinator: CoordinatorThread) -> Iterator[FakeAgents]:
    agents = FakeAgents(coordinator.url)
    try:
        yield agents
    finally:
        agents.close()


def _earned(coordinator: CoordinatorThread, owner: KeyPair) -> tuple[str, str]:
    with LoomClient(coordinator.url, owner) as supplier:
        got = supplier.earnings()
    settled = sum(float(n.settled) for n in got.nodes)
    pending = sum(float(n.pending) for n in got.nodes)
    return f"{settled:g}", f"{pending:g}"


def test_only_confirmed_members_are_billed_and_paid(
    coordinator: CoordinatorThread, client: LoomClient, liar: FakeAgents, tmp_path: Path
) -> None:
    client.deposit("100")
    real = AgentProcess(tmp_path / "real", coordinator.url, "real", "--price", "0.36")
    try:
        _wait_available(client, {"real"}, real)

        # 1. A one-member cluster on the liar (only it has 3 cores): it acks ready, and
        # nobody can confirm it.
        liar_owner = KeyPair.generate()
        node = liar.add("liar", price="3.6", owner=liar_owner, cpu_cores=4)
        coordinator.run_coro(force_available(coordinator.state.session, [node.node_id]))
        client.create_cluster({"name": "solo", "resources": {"cpus": 3}, "duration": "1h"})
        solo = client.wait_cluster("solo", timeout=30)
        assert solo.state == "running", solo.reason
        assert solo.members[0].node_id == node.node_id

        # 2. Head on the real agent (cheaper), worker on the liar.
        client.create_cluster({"name": "pair", "nodes": 2, "resources": {"cpus": 1}})
        pair = client.wait_cluster("pair", timeout=150)
        assert pair.state == "running", pair.reason
        head = next(m for m in pair.members if m.role == "head")
        worker = next(m for m in pair.members if m.role == "worker")
        assert head.node_name == "real" and worker.node_id == node.node_id

        def head_confirmed() -> bool:
            coordinator.run_coro(_confirm(coordinator, pair.id), timeout=60)
            got = client.cluster(pair.id)
            return next(m for m in got.members if m.role == "head").confirmed

        wait_for(head_confirmed, 60, "the head confirmed by the coordinator's probe", 2)
        time.sleep(2.5)
        coordinator.run_coro(_confirm(coordinator, pair.id), timeout=60)
        coordinator.run_coro(_confirm(coordinator, solo.id), timeout=60)
        step = coordinator.run_coro(run_settlement(coordinator.state))
        assert step.settled_micro > 0  # the real head

        pair = client.cluster(pair.id)
        solo = client.cluster(solo.id)
        head = next(m for m in pair.members if m.role == "head")
        worker = next(m for m in pair.members if m.role == "worker")
        print(f"head: {head.confirm_reason}\nworker: {worker.confirm_reason}")
        print(f"solo: {solo.members[0].confirm_reason}")
        assert head.confirmed and "probe" in head.confirm_reason
        assert not worker.confirmed and "GCS" in worker.confirm_reason
        assert not solo.members[0].confirmed
        assert "probe of the head failed" in solo.members[0].confirm_reason

        # The liar's owner earned nothing, settled or pending; the real suppliers did.
        assert _earned(coordinator, liar_owner) == ("0", "0")
        real_owners = {n.owner for n in client.nodes() if n.name == "real"}
        credited = {
            e.account
            for t in client.ledger_transactions()
            if t.kind == "settle"
            for e in t.entries
            if e.account.startswith("earnings:")
        }
        assert credited == {f"earnings:{o}" for o in real_owners}

        # The user paid nothing for the liar's cluster: its whole escrow came back.
        before = float(client.balance().balance)
        down = client.delete_cluster("solo")
        assert down.state == "terminated"
        assert float(client.balance().balance) - before == pytest.approx(3 * 3.6, abs=1e-6)
        client.delete_cluster("pair")
        assert _earned(coordinator, liar_owner) == ("0", "0")
        assert client.ledger_verify().ok
    finally:
        stop_agents([real])


def _wait_available(client: LoomClient, names: set[str], agent: AgentProcess) -> None:
    try:
        wait_for(
            lambda: {n.name for n in client.nodes() if n.state == "available"} >= names,
            300,
            f"the real agents {sorted(names)} verified",
        )
    except AssertionError:
        print([(n.name, n.state) for n in client.nodes()], agent.log()[-3000:])
        raise


def test_honest_members_vouch_for_each_other(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> None:
    """Two real agents: each one's view of the head's GCS confirms the other's member."""
    client.deposit("100")
    real = AgentProcess(tmp_path / "real", coordinator.url, "real", "--price", "0.36")
    real2 = AgentProcess(tmp_path / "real2", coordinator.url, "real2", "--price", "0.5")
    try:
        _wait_available(client, {"real", "real2"}, real)
        # 0. Two honest agents: each one's GCS view vouches for the other's member.
        client.create_cluster({"name": "duo", "nodes": 2, "resources": {"cpus": 1}})
        duo = client.wait_cluster("duo", timeout=150)
        assert duo.state == "running", duo.reason

        def both_confirmed() -> bool:
            coordinator.run_coro(_confirm(coordinator, duo.id), timeout=60)
            return all(m.confirmed for m in client.cluster(duo.id).members)

        wait_for(both_confirmed, 60, "both real members confirmed by each other", 2)
        duo = client.cluster(duo.id)
        print("\nduo:", [m.confirm_reason for m in duo.members])
        assert all("GCS" in m.confirm_reason for m in duo.members)
        time.sleep(2.5)
        coordinator.run_coro(_confirm(coordinator, duo.id), timeout=60)
        assert coordinator.run_coro(run_settlement(coordinator.state)).transactions == 2
        owners = {n.owner for n in client.nodes()}
        assert {
            e.account
            for t in client.ledger_transactions()
            if t.kind == "settle"
            for e in t.entries
            if e.account.startswith("earnings:")
        } == {f"earnings:{o}" for o in owners}
        client.delete_cluster("duo")
        assert client.ledger_verify().ok
    finally:
        stop_agents([real, real2])


async def _confirm(coordinator: CoordinatorThread, cluster_id: str) -> list[str]:
    return await confirm_cluster(coordinator.state, cluster_id)
