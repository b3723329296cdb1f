"""Real agent processes against a real coordinator on loopback."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from loom.client.sdk import LoomClient
from loom.coordinator.config import Settings
from support.servers import AgentProcess, CoordinatorThread, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.heartbeat_timeout_s = 3.0
    return settings


def _node(client: LoomClient, name: str) -> object:
    for node in client.nodes():
        if node.name == name:
            return node
    return None


def test_agent_registers_heartbeats_and_is_listed(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> None:
    agent = AgentProcess(
        tmp_path / "a1",
        coordinator.url,
        "alpha",
        "--region",
        "us-east",
        "--country",
        "us",
        "--price",
        "0.42",
    )
    try:
        node = wait_for(
            lambda: (n := _node(client, "alpha")) and n.state == "available" and n,  # type: ignore[attr-defined]
            60,
            "agent to register and pass the cpu challenge",
        )
        first_beat = node.last_heartbeat  # type: ignore[attr-defined]
        later = wait_for(
            lambda: (n := _node(client, "alpha")) and n.last_heartbeat > first_beat and n,  # type: ignore[attr-defined]
            10,
            "a newer heartbeat",
        )
        data = later.model_dump()
        for field in ("id", "name", "owner", "state", "region", "last_heartbeat", "devices"):
            assert field in data
        assert data["region"] == "us-east" and data["country"] == "US" and data["price"] == "0.42"
        assert data["devices"][0]["kind"] == "cpu" and data["devices"][0]["count"] >= 1
        assert data["devices"][0]["verified"] is True  # the cpu passed its challenge
    finally:
        agent.ensure_dead()


def test_sigkilled_agent_goes_offline_within_timeout_and_comes_back(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path, settings: Settings
) -> None:
    home = tmp_path / "a2"
    agent = AgentProcess(home, coordinator.url, "beta")
    try:
        wait_for(lambda: (n := _node(client, "beta")) and n.state == "available", 20, "available")  # type: ignore[attr-defined]
        agent.kill(signal.SIGKILL)
        killed_at = time.time()
        wait_for(
            lambda: (n := _node(client, "beta")) and n.state == "offline",  # type: ignore[attr-defined]
            settings.heartbeat_timeout_s + 10,
            "offline",
            interval=0.05,
        )
        detected = time.time() - killed_at
        print(
            f"\nSIGKILL detected after {detected:.2f} s (timeout {settings.heartbeat_timeout_s} s)"
        )
        # The last beat may be up to one interval old at kill time; detection comes within
        # timeout + watchdog period + a little scheduling slack.
        assert detected <= settings.heartbeat_timeout_s + 2.0
        assert detected >= settings.heartbeat_timeout_s - settings.heartbeat_interval_s - 0.5
        again = AgentProcess(home, coordinator.url, "beta")
        try:
            back = wait_for(
                lambda: (n := _node(client, "beta")) and n.state == "available" and n,  # type: ignore[attr-defined]
                20,
                "reconnect",
            )
            assert len(client.nodes()) == 1  # same node id: the node key persisted
            assert back is not None
        finally:
            again.ensure_dead()
    finally:
        agent.ensure_dead()


def test_sigterm_drains_cleanly(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path / "a3", coordinator.url, "gamma")
    try:
        wait_for(lambda: (n := _node(client, "gamma")) and n.state == "available", 20, "available")  # type: ignore[attr-defined]
        agent.kill(signal.SIGTERM)
        assert agent.wait(15) == 0
        node = _node(client, "gamma")
        # Drained on purpose, not lost: `drained`, never `offline`.
        assert node is not None and node.state == "drained"  # type: ignore[attr-defined]
    finally:
        agent.ensure_dead()


def test_agent_reconnects_after_coordinator_restart(
    settings: Settings, client: LoomClient, coordinator: CoordinatorThread, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path / "a4", coordinator.url, "delta")
    try:
        wait_for(lambda: (n := _node(client, "delta")) and n.state == "available", 20, "available")  # type: ignore[attr-defined]
        coordinator.stop()
        time.sleep(1.0)
        restarted = CoordinatorThread(settings).start()
        try:
            wait_for(
                lambda: restarted.state.hub.is_connected(_node(client, "delta").id),  # type: ignore[attr-defined]
                30,
                "the agent to reconnect",
            )
            assert agent.proc.poll() is None
        finally:
            restarted.stop()
    finally:
        agent.ensure_dead()


def test_declared_inventory_is_claimed_not_verified(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> None:
    inv = tmp_path / "inventory.yaml"
    inv.write_text("- kind: gpu\n  model: NVIDIA GeForce RTX 4090\n  vram_gb: 24\n  count: 2\n")
    agent = AgentProcess(tmp_path / "a5", coordinator.url, "eps", "--inventory", str(inv))
    try:
        node = wait_for(lambda: _node(client, "eps"), 20, "register")
        gpus = [d for d in node.devices if d.kind == "gpu"]  # type: ignore[attr-defined]
        # No CUDA here: the declared GPUs are challenged and fail (never verified).
        assert [(g.model, g.index, g.verified) for g in gpus] == [
            ("rtx4090", 0, False),
            ("rtx4090", 1, False),
        ]
        assert {g.state for g in gpus} <= {"claimed", "failed"}
    finally:
        agent.ensure_dead()


def test_bad_inventory_file_fails_with_reason(
    coordinator: CoordinatorThread, tmp_path: Path
) -> None:
    inv = tmp_path / "inventory.yaml"
    inv.write_text("- kind: gpu\n  model: rtx4090\n  colour: red\n")
    agent = AgentProcess(tmp_path / "a6", coordinator.url, "zeta", "--inventory", str(inv))
    assert agent.wait(20) == 2
    assert "colour" in agent.log()
