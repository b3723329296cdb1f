"""Keeping clusters alive: a lost worker is replaced; a coordinator outage is survived."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.client.sdk import LoomClient
from loom.protocol.identity import KeyPair
from support.servers import (
    AgentProcess,
    CoordinatorProcess,
    free_port,
    run_spread,
    stop_agents,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="bubblewrap not installed (make sysdeps)"
    ),
]

HEARTBEAT_TIMEOUT = "5"
#: Agents back off up to ~8 s after a short outage; the watchdog waits this long after a start.
RESTART_GRACE = 15.0


@pytest.fixture
def coord(tmp_path: Path, db_url: str) -> Iterator[CoordinatorProcess]:
    c = CoordinatorProcess(
        tmp_path / "coord",
        db_url,
        free_port(),
        "--heartbeat-timeout",
        HEARTBEAT_TIMEOUT,
        "--restart-grace",
        str(RESTART_GRACE),
    ).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def user(coord: CoordinatorProcess) -> Iterator[LoomClient]:
    with LoomClient(coord.url, KeyPair.generate()) as c:
        c.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
        yield c


def _agents(
    coord: CoordinatorProcess, user: LoomClient, tmp_path: Path, n: int
) -> list[AgentProcess]:
    procs = [
        AgentProcess(tmp_path / f"agent{i}", coord.url, f"h{i}", "--price", f"0.{i + 1}")
        for i in range(n)
    ]
    wait_for(
        lambda: len([x for x in user.nodes() if x.state == "available"]) == n, 120, f"{n} agents"
    )
    return procs


def test_lost_worker_is_replaced_and_billing_stops(
    coord: CoordinatorProcess, user: LoomClient, tmp_path: Path
) -> None:
    procs = _agents(coord, user, tmp_path, 3)
    try:
        user.create_cluster({"name": "heal", "nodes": 2, "resources": {"cpus": 1}})
        cluster = user.wait_cluster("heal", timeout=150)
        assert cluster.state == "running", cluster.reason
        names = {n.id: n.name for n in user.nodes()}
        worker = next(m for m in cluster.members if m.role == "worker")
        victim = next(p for p in procs if p.name == names[worker.node_id])
        victim.kill(signal.SIGKILL)
        killed = time.monotonic()
        lost = wait_for(
            lambda: next(
                (
                    m
                    for m in user.cluster("heal").members
                    if m.id == worker.id and m.state == "lost"
                ),
                None,
            ),
            60,
            "the worker to be marked lost",
            interval=0.2,
        )
        detected = time.monotonic() - killed
        healed = wait_for(
            lambda: (
                (c := user.cluster("heal")).state == "running"
                and sum(m.state == "ready" for m in c.members) == 2
                and c
            ),
            90,
            "a replacement to be ready",
            interval=0.2,
        )
        replaced = time.monotonic() - killed
        print(f"\nloss detected after {detected:.1f} s; replacement ready after {replaced:.1f} s")
        assert detected <= 15 + 5  # target 15 s (heartbeat timeout here: 5 s), loose on CI
        assert replaced <= 30 + 60  # target 30 s, loose on a loaded 2-core machine
        assert lost.ended_at is not None  # billing stops at detection
        assert "healing" in [e.to_state for e in healed.events], healed.events
        ready_nodes = {m.node_id for m in healed.members if m.state == "ready"}
        assert worker.node_id not in ready_nodes and len(ready_nodes) == 2
        done = run_spread(healed, 2)
        assert done.returncode == 0, done.stderr[-2000:]
        user.delete_cluster("heal")
    finally:
        stop_agents(procs)


def test_cluster_survives_coordinator_kill_and_restart(
    coord: CoordinatorProcess, user: LoomClient, tmp_path: Path
) -> None:
    procs = _agents(coord, user, tmp_path, 2)
    try:
        user.create_cluster({"name": "outage", "nodes": 2, "resources": {"cpus": 1}})
        cluster = user.wait_cluster("outage", timeout=150)
        assert cluster.state == "running", cluster.reason
        coord.kill()
        # While the coordinator is down the cluster keeps working.
        done = run_spread(cluster, 2)
        assert done.returncode == 0, done.stderr[-2000:]
        time.sleep(float(HEARTBEAT_TIMEOUT) + 1)
        coord.start()
        restarted = time.monotonic()
        wait_for(
            lambda: all(n.state == "allocated" and n.connected_since for n in user.nodes()),
            90,
            "agents to reconnect",
        )
        # Past the watchdog's restart grace and one more timeout: nobody may be offline.
        time.sleep(
            max(0.0, restarted + RESTART_GRACE + float(HEARTBEAT_TIMEOUT) + 2 - time.monotonic())
        )
        after = user.cluster("outage")
        assert after.state == "running", (after.state, after.reason)
        assert sorted(m.state for m in after.members) == ["ready", "ready"]
        assert after.head_address == cluster.head_address
        again = run_spread(after, 2)
        assert again.returncode == 0, again.stderr[-2000:]
        user.delete_cluster("outage")
    finally:
        stop_agents(procs)
