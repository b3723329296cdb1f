"""A worker's home cut off mid-job, across NATs (issue 10): detected, replaced, job goes on.

On the NAT namespace topology of tests/support/nat.py a 3-node cluster spans three homes;
a driver in the head's namespace runs a steady loop of short tasks spread over every node
(a counter, each step printed with the node that ran it). Then one worker's home loses its
uplink (its router's WAN link goes down: packets vanish, nothing resets a connection).
Loom must notice (heartbeats), tell the head's Ray at once (``member.peer_lost``: its GCS
marks the node dead, so the driver's tasks there fail over instead of hanging for
minutes), place a replacement in a fourth home that joins the head over the overlay, and
the job must keep making progress within ~20 s of Loom's detection.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.agent.netns import driver_prefix
from loom.client.sdk import LoomClient
from loom.coordinator import ray_peers
from loom.coordinator.config import Settings
from loom.coordinator.overlay.service import current, push_blocklist
from support.fakeagent import force_available
from support.nat import SYMMETRIC, Topology
from support.nat_cluster import (
    coordinator_url,
    leftovers,
    member_tags,
    nat_settings,
    skip_reason,
    start_agent,
    stop_agents,
)
from support.servers import CoordinatorThread, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]

#: This test's "internet" (TEST-NET-2): other NAT tests use 203.0.113.0/24, and two
#: topologies on one /24 would route each other's packets to the wrong bridge.
PUBLIC = "198.51.100"
#: After Loom's detection, the job must progress again within this (the issue's ~20 s).
RESUME_AFTER_DETECTION_S = 20.0
#: Heartbeat timeout here 6 s (+ the watchdog's tick): the issue measured 11-15 s at 15 s.
DETECTION_S = 20.0

PROGRAM = textwrap.dedent(
    """
    import os, sys, time, ray
    ray.init(address=sys.argv[1], logging_level="ERROR")
    @ray.remote(num_cpus=1)
    def step(i):
        time.sleep(0.2)
        return ray.util.get_node_ip_address()
    i = 0
    while not os.path.exists(sys.argv[2]):
        refs = [step.options(scheduling_strategy="SPREAD").remote(i + k) for k in range(3)]
        for ref in refs:
            ip = ray.get(ref)
            i += 1
            print(f"TICK {time.time():.3f} {i} {ip}", flush=True)
    print("DONE", i, flush=True)
    """
)


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    topo = Topology(public=PUBLIC)
    try:
        yield topo.build()
    finally:
        topo.destroy()


@pytest.fixture
def settings(settings: Settings, topology: Topology, tmp_path: Path) -> Settings:
    return nat_settings(settings, topology, tmp_path)


def _ticks(path: Path) -> list[tuple[float, str]]:
    """(time, node IP) of every step the driver finished so far."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [(float(p[1]), p[3]) for p in (line.split() for line in lines) if p[:1] == ["TICK"]]


#: (home index, agent name): five agents for a 3-node cluster, so that a member that
#: fails to start on a loaded machine is replaced, and a spare is left for the cut.
AGENTS = [(1, "home-1"), (2, "home-2"), (3, "home-3"), (4, "home-4"), (1, "home-1b")]


def _home_of(name: str) -> int:
    return next(i for i, n in AGENTS if n == name)


def test_cut_worker_is_replaced_and_the_job_keeps_going(
    topology: Topology,
    client: LoomClient,
    coordinator: CoordinatorThread,
    settings: Settings,
    tmp_path: Path,
) -> None:
    url = coordinator_url(settings)
    homes = [(tmp_path / name, name) for _, name in AGENTS]
    tags = member_tags(homes)
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    # home-1b shares home 1's NAT and costs more, so the cheapest plan puts the three members
    # in three different homes (placement knows nothing of homes) and 1b is a spare.
    agents = [
        start_agent(topology, i, url, tmp_path / name, name, "0.9" if name == "home-1b" else "0.1")
        for i, name in AGENTS
    ]
    told_before = ray_peers.TOLD["dead"]
    cut: int | None = None
    try:
        nodes = wait_for(
            lambda: (found := client.nodes()) and len(found) == len(AGENTS) and found,
            120,
            f"{len(AGENTS)} agents behind NAT connected",
        )
        # Their hardware challenges, one after another on a loaded 2-core machine, take
        # minutes and are not what this test is about (tests/integration/test_verification.py).
        coordinator.run_coro(force_available(coordinator.state.sessions, [n.id for n in nodes]))
        wait_for(
            lambda: len([n for n in client.nodes() if n.state == "available"]) == len(AGENTS),
            60,
            f"{len(AGENTS)} agents available",
        )
        client.create_cluster({"name": "heal", "nodes": 3, "resources": {"cpus": 1}})
        cluster = client.wait_cluster("heal", timeout=300)
        assert cluster.state == "running", cluster.reason
        ready = [m for m in cluster.members if m.state == "ready"]
        assert len(ready) == 3, cluster.members
        head = next(m for m in ready if m.role == "head")
        # Cut a worker's home that holds no other member and not the head; not the
        # symmetric NAT's if there is a choice.
        crowded = {_home_of(m.node_name) for m in ready if m.role == "head"}
        counts = [_home_of(m.node_name) for m in ready]
        choices = [
            m
            for m in ready
            if m.role == "worker"
            and _home_of(m.node_name) not in crowded
            and counts.count(_home_of(m.node_name)) == 1
        ]
        assert choices, f"no worker alone in its home: {[m.node_name for m in ready]}"
        victim = sorted(choices, key=lambda m: _home_of(m.node_name) == SYMMETRIC)[0]
        cut_home = _home_of(victim.node_name)
        prefix = driver_prefix(cluster.head_address, tags)
        assert prefix, "the head's namespace holds its overlay address"
        stop, out = tmp_path / "stop-driver", tmp_path / "driver.out"
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.ray_token)
        driver = subprocess.Popen(
            [*prefix, sys.executable, "-c", PROGRAM, cluster.head_address, str(stop)],
            env=env,
            stdout=open(out, "wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            ips = {m.overlay_ip for m in ready}
            wait_for(
                lambda: ips <= {ip for _, ip in _ticks(out)} or driver.poll() is not None,
                180,
                "the job's steps on every node",
                interval=0.5,
            )
            assert driver.poll() is None, out.read_text(errors="replace")[-3000:]
            t_cut = time.time()
            topology.cut(cut_home)
            cut = cut_home
            lost = wait_for(
                lambda: next(
                    (
                        m
                        for m in client.cluster("heal").members
                        if m.id == victim.id and m.state == "lost"
                    ),
                    None,
                ),
                90,
                "the cut worker to be marked lost",
                interval=0.2,
            )
            assert lost.ended_at is not None
            t_lost = lost.ended_at
            resumed = wait_for(
                lambda: (
                    next((t for t, _ in _ticks(out) if t > t_lost), None)
                    or driver.poll() is not None
                ),
                120,
                "the job to progress after the loss",
                interval=0.2,
            )
            assert driver.poll() is None, out.read_text(errors="replace")[-3000:]
            healed = wait_for(
                lambda: (
                    (c := client.cluster("heal")).state == "running"
                    and sum(m.state == "ready" for m in c.members) == 3
                    and c
                ),
                180,
                "a replacement to be ready",
                interval=0.5,
            )
            new = next(
                m
                for m in healed.members
                if m.state == "ready" and m.id not in {x.id for x in ready}
            )
            assert _home_of(new.node_name) != cut_home and new.overlay_ip, new
            # The cut worker's certificates are revoked: the lighthouse blocks them and
            # every remaining member's Nebula (through its real agent) reloaded the list.
            overlay = current(coordinator.state)
            assert overlay is not None
            blocked = coordinator.run_coro(overlay.book.blocklist(cluster.id))
            assert blocked and overlay.lighthouse_list == tuple(blocked)
            holders = [coordinator.run_coro(overlay.book.revoked(f)) for f in blocked]
            assert all(getattr(r, "holder", "") == victim.id for r in holders)
            reloaded = coordinator.run_coro(push_blocklist(coordinator.state, cluster.id))
            assert reloaded == sorted(m.id for m in healed.members if m.state == "ready")
            assert any(m.id == head.id and m.state == "ready" for m in healed.members)
            on_new = wait_for(
                lambda: next((t for t, ip in _ticks(out) if ip == new.overlay_ip), None),
                120,
                "a step of the job on the replacement (joined over the overlay)",
                interval=0.5,
            )
        finally:
            stop.touch()
            try:
                driver.wait(60)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
        ticks = _ticks(out)
        after_cut = [t for t, _ in ticks if t > t_cut]
        stall = max(b - a for a, b in zip([t_cut, *after_cut], after_cut, strict=False))
        detection = t_lost - t_cut
        print(
            f"\ncut home-{cut}: Loom detected the loss after {detection:.1f} s; the job "
            f"progressed again {resumed - t_lost:.1f} s after detection (longest stall "
            f"{stall:.1f} s); replacement on {new.node_name} ready "
            f"{new.ready_at - t_lost:.1f} s after detection (ready_at), first step on it "
            f"{on_new - t_lost:.1f} s after; "
            f"{len(ticks)} steps; head told {ray_peers.TOLD['dead'] - told_before}x "
            f"({dict(ray_peers.TOLD)})"
        )
        assert detection <= DETECTION_S
        assert ray_peers.TOLD["dead"] > told_before, dict(ray_peers.TOLD)
        assert resumed - t_lost <= RESUME_AFTER_DETECTION_S
        assert client.delete_cluster("heal").state == "terminated"
    finally:
        if cut is not None:
            topology.reconnect(cut)
        killed = stop_agents(agents)
    left = leftovers(tags, tmp_path)
    # Every agent stops on SIGTERM and leaves nothing. (An agent once hung here: a fork
    # during the hardware challenge's BLAS product deadlocked OpenBLAS, and the drained
    # agent waited for that thread for ever; see tests/agent/test_prover_threads.py.)
    hung = sorted(str(a.args[a.args.index("--name") + 1]) for a in killed)
    logs = {name: (tmp_path / name / "agent.log").read_text(errors="replace") for name in hung}
    if hung:  # clean up after it first, so the machine stays clean for the next test
        theirs = member_tags([(tmp_path / name, name) for name in hung])
        for x in left:
            if x.startswith("process "):
                subprocess.run(["kill", "-9", x.split()[1]], check=False)
            elif x.removeprefix("netns ").startswith(theirs):
                subprocess.run(["ip", "netns", "del", x.removeprefix("netns ")], check=False)
    assert not hung, "agents ignored SIGTERM (their logs end with their stacks):\n" + "\n".join(
        f"--- {name} ---\n{text[-20000:]}" for name, text in logs.items()
    )
    assert not left
    # ... and none had to leave a busy worker thread behind (loom.agent.cli._stop_threads).
    busy = [n for _, n in AGENTS if "still busy" in (tmp_path / n / "agent.log").read_text()]
    assert not busy, busy
