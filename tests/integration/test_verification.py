"""Hardware verification end to end: real agent processes prove (or fail to prove) devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.client.sdk import LoomClient
from loom.coordinator.placement_index import loaded_now
from loom.coordinator.state import CoordinatorState
from loom.core.catalog import CPU_MODEL
from loom.core.placement import PlacementPlan, Requirement
from loom.protocol.api import NodeOut
from support.servers import AgentProcess, CoordinatorThread, wait_for

pytestmark = pytest.mark.slow


def _node(client: LoomClient, name: str) -> NodeOut | None:
    for node in client.nodes():
        if node.name == name:
            return node
    return None


async def _placeable(state: CoordinatorState, model: str, units: int) -> bool:
    req = Requirement(options=((model, units),))
    async with state.session() as session:  # an index read from the database now
        connected = set(state.hub.connections)
        index = await loaded_now(session, require_verified=True, presence=connected)
    return isinstance(await index.place(req, 1), PlacementPlan)


def test_honest_cpu_verifies_and_a_declared_gpu_it_does_not_have_fails(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> None:
    inventory = tmp_path / "devices.yaml"
    inventory.write_text("- kind: gpu\n  model: rtx4090\n  vram_gb: 24\n")
    agent = AgentProcess(tmp_path / "a", coordinator.url, "honest", "--inventory", str(inventory))
    try:
        # `registering` lasts from the handshake's commit until the connect hooks ran.
        first = wait_for(
            lambda: (n := _node(client, "honest")) is not None and n.state != "registering" and n,
            20,
            "the agent to register",
        )
        assert first.state in ("verifying", "available")

        def settled() -> NodeOut | None:
            n = _node(client, "honest")
            if n is None or n.state != "available":
                return None
            states = {d.kind: d.state for d in n.devices}
            return n if states == {"cpu": "verified", "gpu": "failed"} else None

        node = wait_for(settled, 90, "cpu verified and the declared gpu failed", interval=0.3)
        cpu = next(d for d in node.devices if d.kind == "cpu")
        assert cpu.verified

        history = client.node_challenges(node.id)
        by_device = {c.device_id: c for c in history}
        cpu_run = by_device[f"{node.id}:cpu"]
        assert cpu_run.outcome == "passed" and cpu_run.device_class == "cpu"
        assert cpu_run.measured_rate is not None
        assert cpu_run.measured_rate >= cpu_run.required_rate
        assert cpu_run.openings_checked > 0 and cpu_run.openings_failed == 0
        gpu_run = by_device[f"{node.id}:gpu0"]
        assert gpu_run.outcome == "failed" and gpu_run.device_class == "rtx4090"
        assert "cannot prove" in gpu_run.reason and not gpu_run.evidence
        assert client.evidence(node=node.id) == []  # failing to prove is not fraud
        assert 0.0 < node.reliability < 1.0

        # The failed GPU is unplaceable; the node still sells its CPU.
        assert not coordinator.run_coro(_placeable(coordinator.state, "rtx4090", 1))
        assert coordinator.run_coro(_placeable(coordinator.state, CPU_MODEL, 1))
    finally:
        agent.ensure_dead()
