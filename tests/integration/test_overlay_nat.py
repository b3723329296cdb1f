"""Clusters across NAT over the Nebula overlay (issue 10): real namespaces, real NAT.

Topology built here (root only; CI runs as root)::

    root ns: the coordinator (HTTP + lighthouse/relay) on 203.0.113.1 ──┐
    "internet" ns: a bridge ────────────────────────────────────────────┤
      ├── router r1 (203.0.113.11, masquerade)               ── supplier s1 192.168.71.2
      ├── router r2 (203.0.113.12, masquerade)               ── supplier s2 192.168.72.2
      └── router r3 (203.0.113.13, masquerade fully-random)  ── supplier s3 192.168.73.2
                     (a symmetric NAT: hole punching fails, the relay carries it)

Each supplier runs a real agent, whose members get their own namespaces and Nebula.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.agent.netns import driver_prefix, netns_names, unavailable_reason
from loom.agent.raynode_spec import agent_tag
from loom.client.sdk import LoomClient
from loom.coordinator.config import Settings
from loom.protocol.identity import KeyPair
from loom.protocol.keystore import KeyStore
from support.nat import COORD_IP, SYMMETRIC, Topology, sh
from support.servers import agent_env, free_port, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        unavailable_reason() is not None or shutil.which("nebula") is None,
        reason=f"needs root, iproute2, nftables and nebula ({unavailable_reason()})",
    ),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]

#: (home dir, agent name) of every agent the test starts.
HOMES = [("home1", "home-1"), ("home2", "home-2"), ("home3", "home-3"), ("home1b", "home-1b")]


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        yield topo.build()
    finally:
        topo.destroy()


@pytest.fixture
def settings(settings: Settings, topology: Topology, tmp_path: Path) -> Settings:
    udp = free_port()
    settings.host = COORD_IP
    settings.overlay_listen = f"{COORD_IP}:{udp}"
    settings.overlay_dir = str(tmp_path / "overlay")
    settings.heartbeat_timeout_s = 6.0
    return settings


PROGRAM = textwrap.dedent(
    """
    import sys, time, numpy as np, ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Pin
    ray.init(address=sys.argv[1], logging_level="ERROR")
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    @ray.remote(num_cpus=0.1)
    def where():
        return ray.get_runtime_context().get_node_id()
    @ray.remote(num_cpus=0.1)
    def make():
        return np.ones(50 * 1024 * 1024, dtype=np.uint8)
    @ray.remote(num_cpus=0.1)
    def total(a):
        return int(a.sum()), ray.get_runtime_context().get_node_id()
    seen = set(ray.get([where.options(scheduling_strategy=Pin(n, soft=False)).remote()
                        for n in nodes], timeout=120))
    moved = []
    for i, src in enumerate(nodes):
        dst = nodes[(i + 1) % len(nodes)]
        t0 = time.monotonic()
        ref = make.options(scheduling_strategy=Pin(src, soft=False)).remote()
        s, ran = ray.get(total.options(scheduling_strategy=Pin(dst, soft=False)).remote(ref),
                         timeout=180)
        assert s == 50 * 1024 * 1024 and ran == dst
        moved.append(round(time.monotonic() - t0, 2))
    print(f"NODES {len(seen)} MOVED-50MB {moved}", flush=True)
    """
)


def _connect(prefix: list[str], address: str) -> str:
    """Open a TCP connection to ``address`` from inside a member's namespace."""
    host, port = address.rsplit(":", 1)
    code = (
        "import socket\ntry:\n"
        f" socket.create_connection(({host!r}, {port}), timeout=4); print('connected')\n"
        "except OSError as e:\n print(type(e).__name__)"
    )
    assert prefix, f"no local member namespace holds {address}"
    done = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()[-300:]


def _start_agent(
    topology: Topology, i: int, url: str, home: Path, name: str = ""
) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{topology.suppliers[i]}",
            sys.executable,
            "-m",
            "loom",
            "worker",
            "start",
            "--name",
            name or f"home-{i}",
            "--coordinator",
            url,
        ],
        env=agent_env(home, url),
        stdout=open(home / "agent.log", "wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The owner's LOOM_HOME (its key), for the `loom` CLI."""
    path = tmp_path / "user"
    path.mkdir()
    return path


@pytest.fixture
def user_key(home: Path) -> KeyPair:
    return KeyStore.for_home(home).create("default")


def test_three_homes_behind_nat_form_one_cluster(
    topology: Topology, client: LoomClient, settings: Settings, tmp_path: Path, home: Path
) -> None:
    url = f"http://{COORD_IP}:{settings.port}"
    # Names of our agents' member namespaces start with these (other tests may run agents).
    tags = tuple(
        agent_tag(tmp_path / home / "agents" / name / "members") + "-" for home, name in HOMES
    )
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    agents = [_start_agent(topology, i, url, tmp_path / f"home{i}") for i in (1, 2, 3)]
    try:
        wait_for(
            lambda: len([n for n in client.nodes() if n.state == "available"]) == 3,
            180,
            "3 agents behind NAT",
        )
        t0 = time.monotonic()
        client.create_cluster({"name": "nat", "nodes": 3, "resources": {"cpus": 1}})
        cluster = client.wait_cluster("nat", timeout=240)
        ready_s = time.monotonic() - t0
        assert cluster.state == "running", cluster.reason
        print(f"\n3 members across 3 NATs ready in {ready_s:.1f} s; timings {cluster.timings}")
        overlay = [m.overlay_ip for m in cluster.members]
        assert all(ip.startswith("10.250.") for ip in overlay), cluster.members
        assert len(set(overlay)) == 3
        assert cluster.head_address.rsplit(":", 1)[0] in overlay
        prefix = driver_prefix(cluster.head_address, tags)
        assert prefix, "the head's namespace holds its overlay address"
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.ray_token)
        done = subprocess.run(
            [*prefix, sys.executable, "-c", PROGRAM, cluster.head_address],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        print(done.stdout.strip())
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "NODES 3 " in done.stdout
        # The member behind the symmetric NAT talks to the others through the relay.
        behind = next(m.id for m in cluster.members if m.node_name == f"home-{SYMMETRIC}")
        wait_for(
            lambda: next(m for m in client.cluster("nat").members if m.id == behind).relayed,
            30,
            "the symmetric-NAT member reported as relayed",
        )
        # ... and only it: the two behind cone NATs reach each other directly.
        wait_for(
            lambda: all(
                m.relayed is False
                for m in client.cluster("nat").members
                if m.node_name != f"home-{SYMMETRIC}"
            ),
            30,
            "the cone-NAT members reported as not relayed",
        )
        # Another cluster's member (its own overlay certificate, another group) cannot open
        # anything on this cluster's overlay addresses; this cluster's own members can.
        # (on a second agent of home 1: the same host as one of this cluster's members)
        agents.append(_start_agent(topology, 1, url, tmp_path / "home1b", name="home-1b"))
        wait_for(
            lambda: any(n.name == "home-1b" and n.state == "available" for n in client.nodes()),
            180,
            "a second agent in home 1",
        )
        client.create_cluster({"name": "other", "nodes": 1, "resources": {"cpus": 1}})
        other = client.wait_cluster("other", timeout=240)
        assert other.state == "running", other.reason
        gcs = cluster.head_address
        stranger = _connect(driver_prefix(other.head_address, tags), gcs)
        assert stranger != "connected", stranger
        worker_ip = next(m.overlay_ip for m in cluster.members if m.role == "worker")
        assert _connect(driver_prefix(f"{worker_ip}:1", tags), gcs) == "connected"
        assert client.delete_cluster("other").state == "terminated"
        # The owner, behind yet another NAT, joins the overlay and reaches the head directly.
        user_ns = ["nsenter", f"--net=/run/netns/{topology.user}"]
        assert _connect(user_ns, gcs) != "connected"  # not before joining
        env_user = dict(os.environ, LOOM_HOME=str(home), LOOM_COORDINATOR=url)
        connect_log = tmp_path / "connect.log"
        joined = subprocess.Popen(
            [*user_ns, sys.executable, "-m", "loom", "cluster", "connect", "nat"],
            env=env_user,
            stdout=open(connect_log, "wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: _connect(user_ns, gcs) == "connected", 60, "the user on the overlay")
            # Plain Ray tools from the user's machine: the Jobs API on the head's overlay IP.
            head_ip = gcs.rsplit(":", 1)[0]
            jobs = f"http://{head_ip}:{cluster.dashboard_url.rstrip('/').rsplit(':', 1)[1]}"
            assert cluster.dashboard_url.startswith(f"http://{head_ip}:"), cluster.dashboard_url
            submitted = subprocess.run(
                [
                    *user_ns,
                    str(Path(sys.executable).parent / "ray"),
                    "job",
                    "submit",
                    "--address",
                    jobs,
                    "--",
                    "python",
                    "-c",
                    "print('job over the overlay', 6 * 7)",
                ],
                env=env_user | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.ray_token},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
            assert "job over the overlay 42" in submitted.stdout, submitted.stdout[-2000:]
            # ... while the supplier's LAN (its router, routing the overlay IP to the
            # supplier) reaches neither the Jobs API nor the GCS.
            home_i = int(next(m.node_name for m in cluster.members if m.role == "head")[-1])
            router = topology.namespaces[topology.namespaces.index(topology.suppliers[home_i]) - 1]
            router_ns = ["nsenter", f"--net=/run/netns/{router}"]
            sh(
                "ip",
                "-n",
                router,
                "route",
                "add",
                f"{head_ip}/32",
                "via",
                f"192.168.{70 + home_i}.2",
            )
            try:
                for target in (jobs.removeprefix("http://"), gcs):
                    assert _connect(router_ns, target) != "connected", target
            finally:
                sh("ip", "-n", router, "route", "del", f"{head_ip}/32", check=False)
        finally:
            joined.terminate()
            joined.wait(20)
        out = connect_log.read_text(errors="replace")
        assert "on the overlay of nat" in out, out
        assert joined.returncode == 0, out
        assert "left the overlay; certificate u-" in out and "revoked" in out, out  # at once
        assert "loom-user" not in sh("ip", "-n", topology.user, "link", "show")  # it left
        assert client.delete_cluster("nat").state == "terminated"
    finally:
        for p in agents:
            p.terminate()
        for p in agents:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    # Nothing left: no member namespace, no member's Nebula (its tun went with its netns).
    assert not [n for n in netns_names() if n.startswith(tags)]
    nebulas = sh("pgrep", "-af", "nebula", check=False)
    assert f"{tmp_path}/home" not in nebulas, nebulas
