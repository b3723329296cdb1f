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
import secrets
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
from support.servers import agent_env, free_port, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        unavailable_reason() is not None or shutil.which("nebula") is None,
        reason=f"needs root, iproute2, nftables and nebula ({unavailable_reason()})",
    ),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]

COORD_IP = "203.0.113.1"
SYMMETRIC = 3


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr}")
    return done.stdout


class Topology:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.inet = self._ns("inet")
        self.suppliers: dict[int, str] = {}

    def _ns(self, kind: str) -> str:
        name = f"lt-{self.tag}-{kind}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def build(self) -> Topology:
        inet = ["ip", "-n", self.inet]
        sh(*inet, "link", "add", "br0", "type", "bridge")
        sh(*inet, "link", "set", "br0", "up")
        # The coordinator's "public" address, in the root namespace.
        root_if = f"ltc{self.tag}"
        sh(
            "ip",
            "link",
            "add",
            root_if,
            "type",
            "veth",
            "peer",
            "name",
            "coord",
            "netns",
            self.inet,
        )
        self.links.append(root_if)
        sh("ip", "addr", "add", f"{COORD_IP}/24", "dev", root_if)
        sh("ip", "link", "set", root_if, "up")
        sh(*inet, "link", "set", "coord", "master", "br0")
        sh(*inet, "link", "set", "coord", "up")
        for i in (1, 2, 3):
            router, supplier = self._ns(f"r{i}"), self._ns(f"s{i}")
            r, s = ["ip", "-n", router], ["ip", "-n", supplier]
            sh(
                *inet,
                "link",
                "add",
                f"w{i}",
                "type",
                "veth",
                "peer",
                "name",
                "wan",
                "netns",
                router,
            )
            sh(*inet, "link", "set", f"w{i}", "master", "br0")
            sh(*inet, "link", "set", f"w{i}", "up")
            sh(*r, "addr", "add", f"203.0.113.{10 + i}/24", "dev", "wan")
            sh(*r, "link", "set", "wan", "up")
            sh(*r, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", supplier)
            sh(*r, "addr", "add", f"192.168.{70 + i}.1/24", "dev", "lan")
            sh(*r, "link", "set", "lan", "up")
            sh(*s, "addr", "add", f"192.168.{70 + i}.2/24", "dev", "eth0")
            sh(*s, "link", "set", "eth0", "up")
            sh(*s, "route", "add", "default", "via", f"192.168.{70 + i}.1")
            sh("nsenter", f"--net=/run/netns/{router}", "sysctl", "-qw", "net.ipv4.ip_forward=1")
            random = " fully-random" if i == SYMMETRIC else ""
            sh(
                "nsenter",
                f"--net=/run/netns/{router}",
                "nft",
                "-f",
                "-",
                stdin=(
                    "table ip nat {\n chain post {\n"
                    "  type nat hook postrouting priority srcnat;\n"
                    f'  oifname "wan" masquerade{random}\n }}\n}}\n'
                ),
            )
            self.suppliers[i] = supplier
        return self

    def destroy(self) -> None:
        for name in self.namespaces:
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)
        for link in self.links:
            sh("ip", "link", "del", link, check=False)


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


def _start_agent(topology: Topology, i: int, url: str, home: Path) -> subprocess.Popen[bytes]:
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
            f"home-{i}",
            "--coordinator",
            url,
        ],
        env=agent_env(home, url),
        stdout=open(home / "agent.log", "wb"),
        stderr=subprocess.STDOUT,
    )


def test_three_homes_behind_nat_form_one_cluster(
    topology: Topology, client: LoomClient, settings: Settings, tmp_path: Path
) -> None:
    url = f"http://{COORD_IP}:{settings.port}"
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
        prefix = driver_prefix(cluster.head_address)
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
    tags = [
        agent_tag(tmp_path / f"home{i}" / "agents" / f"home-{i}" / "members") + "-"
        for i in (1, 2, 3)
    ]
    assert not [n for n in netns_names() if n.startswith(tuple(tags))]
    nebulas = sh("pgrep", "-af", "nebula", check=False)
    assert f"{tmp_path}/home" not in nebulas, nebulas
