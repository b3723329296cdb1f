"""Real agents, real Ray, real bubblewrap sandboxes on loopback."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.client.sdk import LoomClient
from loom.coordinator.config import Settings
from loom.protocol.api import ClusterOut
from support.servers import AgentProcess, CoordinatorThread, run_spread, stop_agents, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="bubblewrap not installed (make sysdeps)"
    ),
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.heartbeat_timeout_s = 4.0
    return settings


@pytest.fixture
def agents(
    coordinator: CoordinatorThread, client: LoomClient, tmp_path: Path
) -> Iterator[list[AgentProcess]]:
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    procs = [
        AgentProcess(tmp_path / f"agent{i}", coordinator.url, f"ray{i}", "--price", f"0.{i + 1}")
        for i in range(4)
    ]
    try:
        wait_for(
            lambda: len([n for n in client.nodes() if n.state == "available"]) == 4, 120, "4 agents"
        )
        yield procs
    finally:
        stop_agents(procs)


def leftovers(tmp_path: Path, cluster: ClusterOut) -> tuple[list[int], list[Path]]:
    """Processes and member directories of the cluster still on the 'supplier machines'."""
    pids = []
    member_ids = [m.id for m in cluster.members]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cluster.ray_token.encode() in blob or any(m.encode() in blob for m in member_ids):
            pids.append(int(entry.name))
    dirs = [
        p
        for p in tmp_path.glob("agent*/agents/*/members/**/*")
        if any(m in str(p) for m in member_ids)
    ]
    return pids, dirs


def describe(pids: list[int]) -> list[str]:
    """Each leftover process as `pid: command line` (for a failure's message)."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "(gone)"
        out.append(f"{pid}: {cmd[:300]}")
    return out


def test_three_node_cluster_runs_tasks_everywhere_and_leaves_nothing(
    client: LoomClient, agents: list[AgentProcess], tmp_path: Path
) -> None:
    t0 = time.monotonic()
    client.create_cluster({"name": "e2e", "nodes": 3, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("e2e", timeout=150)
    print(f"\ncluster ready in {time.monotonic() - t0:.1f} s; timings {cluster.timings}")
    assert cluster.state == "running", cluster.reason
    assert sorted(m.role for m in cluster.members) == ["head", "worker", "worker"]
    done = run_spread(cluster, 3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 distinct Ray node(s)" in done.stdout
    # A driver without the cluster's token is refused.
    bad = cluster.model_copy(update={"ray_token": "not-the-token-" + "x" * 20})
    refused = run_spread(bad, 3)
    assert refused.returncode != 0
    assert leftovers(tmp_path, cluster)[0], "sanity: the cluster's processes are visible"
    down = client.delete_cluster("e2e")
    assert down.state == "terminated"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids, dirs = leftovers(tmp_path, cluster)
        if not pids and not dirs:
            break
        time.sleep(0.5)
    assert pids == [] and dirs == [], (pids, dirs)
    assert {n.state for n in client.nodes()} == {"available"}


def test_agent_killed_while_its_member_is_starting(
    client: LoomClient, agents: list[AgentProcess]
) -> None:
    client.create_cluster({"name": "k", "nodes": 2, "resources": {"cpus": 1}})
    by_node = {n.id: n.name for n in client.nodes()}

    def starting_worker() -> str | None:
        c = client.cluster("k")
        for m in c.members:
            if m.role == "worker" and m.state == "starting":
                return by_node[m.node_id]
        return None

    victim_name = wait_for(starting_worker, 120, "a worker to be starting", interval=0.05)
    victim = next(a for a in agents if a.name == victim_name)
    victim.kill(signal.SIGKILL)
    cluster = client.wait_cluster("k", timeout=150)
    # Replaced on another node, or failed with a reason a user can act on.
    if cluster.state == "running":
        lost = [m for m in cluster.members if m.state == "lost"]
        assert len(lost) == 1 and lost[0].node_name == victim_name
        assert victim_name not in {m.node_name for m in cluster.members if m.state == "ready"}
    else:
        assert cluster.state == "failed" and cluster.reason
    if cluster.state == "running":
        client.delete_cluster("k")


def test_agent_drain_stops_its_members_and_the_cluster_heals(
    client: LoomClient, agents: list[AgentProcess], tmp_path: Path
) -> None:
    client.create_cluster({"name": "drain", "nodes": 2, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("drain", timeout=150)
    assert cluster.state == "running", cluster.reason
    names = {n.id: n.name for n in client.nodes()}
    worker = next(m for m in cluster.members if m.role == "worker")
    victim = next(a for a in agents if a.name == names[worker.node_id])
    victim.kill(signal.SIGTERM)
    assert victim.wait(60) == 0
    # The drained agent left nothing of its member behind ...
    only_worker = cluster.model_copy(update={"members": [worker], "ray_token": "\0unused\0"})
    # (The head's agent may still be telling its GCS that the member is gone: a short-lived
    # `loom.agent.ray_peer` naming the member, bounded by its --timeout; wait past it.)
    deadline = time.monotonic() + 25
    while (left := leftovers(tmp_path, only_worker)) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.5)
    pids, dirs = left
    assert pids == [] and dirs == [], (describe(pids), dirs)
    # ... and the coordinator replaced it on another node.
    healed = wait_for(
        lambda: (
            (c := client.cluster("drain")).state == "running"
            and sum(m.state == "ready" for m in c.members) == 2
            and c
        ),
        120,
        "the cluster to heal",
    )
    assert worker.id in {m.id for m in healed.members if m.state == "lost"}
    client.delete_cluster("drain")
