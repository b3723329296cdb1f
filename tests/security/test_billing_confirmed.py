"""Paying only for work done (issue 14 §3): a member is billed only while someone other
than its own agent confirms it.

One real coordinator, one real agent (real Ray in bubblewrap) and one lying agent that
acks ``member.start`` as ready without starting anything:

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
    liar_owner = KeyPair.generate()
    node = liar.add("liar", price="3.6", owner=liar_owner, cpu_cores=4)
    coordinator.run_coro(force_available(coordinator.state.session, [node.node_id]))

    # 1. A one-member cluster on the liar: it acks ready, nobody can confirm it.
    client.create_cluster({"name": "solo", "resources": {"cpus": 1}, "duration": "1h"})
    solo = client.wait_cluster("solo", timeout=30)
    assert solo.state == "running", solo.reason

    # 2. A real agent joins (cheaper: it gets the head of the next cluster).
    real = AgentProcess(tmp_path / "real", coordinator.url, "real", "--price", "0.36")
    try:
        try:
            wait_for(
                lambda: any(n.name == "real" and n.state == "available" for n in client.nodes()),
                240,
                "the real agent verified",
            )
        except AssertionError:
            print([(n.name, n.state) for n in client.nodes()], real.log()[-3000:])
            raise
        client.create_cluster({"name": "pair", "nodes": 2, "resources": {"cpus": 1}})
        pair = client.wait_cluster("pair", timeout=150)
        assert pair.state == "running", pair.reason
        head = next(m for m in pair.members if m.role == "head")
        worker = next(m for m in pair.members if m.role == "worker")
        assert head.node_name == "real" and worker.node_id == node.node_id

        def head_confirmed_twice() -> bool:
            coordinator.run_coro(_confirm(coordinator, pair.id), timeout=60)
            got = client.cluster(pair.id)
            return next(m for m in got.members if m.role == "head").confirmed

        wait_for(head_confirmed_twice, 60, "the head confirmed by the coordinator's probe", 2)
        time.sleep(2.5)
        coordinator.run_coro(_confirm(coordinator, pair.id), timeout=60)
        coordinator.run_coro(_confirm(coordinator, solo.id), timeout=60)
        step = coordinator.run_coro(run_settlement(coordinator.state))
        assert step.settled_micro > 0  # the real head

        pair = client.cluster(pair.id)
        solo = client.cluster(solo.id)
        head = next(m for m in pair.members if m.role == "head")
        worker = next(m for m in pair.members if m.role == "worker")
        print(f"\nhead: {head.confirm_reason}\nworker: {worker.confirm_reason}")
        print(f"solo: {solo.members[0].confirm_reason}")
        assert head.confirmed and "probe" in head.confirm_reason
        assert not worker.confirmed and "GCS" in worker.confirm_reason
        assert not solo.members[0].confirmed
        assert "probe of the head failed" in solo.members[0].confirm_reason

        # The liar's owner earned nothing, settled or pending; the real supplier did.
        assert _earned(coordinator, liar_owner) == ("0", "0")
        real_owner = next(n.owner for n in client.nodes() if n.name == "real")
        credited = {
            e.account
            for t in client.ledger_transactions()
            if t.kind == "settle"
            for e in t.entries
            if e.account.startswith("earnings:")
        }
        assert credited == {f"earnings:{real_owner}"}

        # The user paid nothing for the liar's cluster: its whole escrow came back.
        before = float(client.balance().balance)
        down = client.delete_cluster("solo")
        assert down.state == "terminated"
        assert float(client.balance().balance) - before == pytest.approx(3.6, abs=1e-6)
        client.delete_cluster("pair")
        assert _earned(coordinator, liar_owner) == ("0", "0")
        assert client.ledger_verify().ok
    finally:
        stop_agents([real])


async def _confirm(coordinator: CoordinatorThread, cluster_id: str) -> list[str]:
    return await confirm_cluster(coordinator.state, cluster_id)
