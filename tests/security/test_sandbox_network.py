"""A member's network is its own: from inside a sandbox, the host, its LAN and other
clusters are out of reach (issue 14 §1, issue 10 §3). Real namespaces, real nftables,
real bubblewrap, a real agent and Ray node; runs as root (CI), skipped otherwise.

Topology the tests build around the agent's own member namespaces::

    host: PostgreSQL 127.0.0.1:5432, a Redis stand-in on 127.0.0.1, the agent's metrics
          port on 0.0.0.0 — none of it may be reached from a member
    "LAN" namespace      192.168.77.2 (veth from the host)   — unreachable from members
    "internet" namespace 203.0.113.2  (veth from the host)   — reachable only with egress
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from loom.agent.netns import (
    IF_PREFIX,
    TABLE,
    MemberNet,
    NetnsConfig,
    NetnsManager,
    driver_prefix,
    host_lock,
    netns_names,
    unavailable_reason,
)
from loom.agent.raynode_spec import agent_tag
from loom.agent.runtimes import BwrapRuntime, probe_bwrap
from loom.agent.runtimes.base import RunSpec
from loom.client.sdk import LoomClient
from support.servers import AgentProcess, CoordinatorThread, free_port, stop_agents, wait_for

pytestmark = [
    pytest.mark.skipif(
        unavailable_reason() is not None,
        reason=f"member namespaces need root, ip, nft, nsenter: {unavailable_reason()}",
    ),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]

LAN_IP, INTERNET_IP, SERVICE_PORT = "192.168.77.2", "203.0.113.2", 8080

#: Connects to each (host, port) in argv[1] (JSON) at once; prints {"host:port": result}.
CONNECT = textwrap.dedent(
    """
    import json, socket, sys, concurrent.futures as cf
    def one(t):
        try:
            with socket.create_connection((t[0], t[1]), timeout=2):
                return "connected"
        except OSError as exc:
            return type(exc).__name__
    targets = json.loads(sys.argv[1])
    with cf.ThreadPoolExecutor(len(targets)) as pool:
        out = dict(zip([f"{h}:{p}" for h, p in targets], pool.map(one, targets)))
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr}")
    return done.stdout


def host_address() -> str:
    """An address of this host other than loopback (its default route's source)."""
    out = sh("ip", "-j", "route", "get", "1.1.1.1", check=False)
    try:
        return str(json.loads(out)[0]["prefsrc"])
    except (ValueError, KeyError, IndexError):
        return "127.0.0.1"


@dataclass
class OtherMachine:
    """A namespace standing for another machine, with a TCP listener in it."""

    name: str
    veth: str
    ip: str
    proc: subprocess.Popen[bytes]


def listener(port: int, host: str, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    code = (
        "import socket,sys,time;s=socket.socket();"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(({host!r},{port}));s.listen(64);print('up',flush=True)\n"
        "while True:\n c,_=s.accept();c.close()"
    )
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    return proc


def build_host(tag: str, kind: str, subnet: str) -> OtherMachine:
    name, veth = f"lt-{tag}-{kind}", f"lt{tag}{kind[0]}"
    host_ip, ip = f"{subnet}.1", f"{subnet}.2"
    sh("ip", "netns", "add", name)
    sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
    sh("ip", "addr", "add", f"{host_ip}/24", "dev", veth)
    sh("ip", "link", "set", veth, "up")
    sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
    sh("ip", "-n", name, "link", "set", "eth0", "up")
    sh("ip", "-n", name, "link", "set", "lo", "up")
    sh("ip", "-n", name, "route", "add", "default", "via", host_ip)
    proc = listener(SERVICE_PORT, "0.0.0.0", ["nsenter", f"--net=/run/netns/{name}"])
    return OtherMachine(name, veth, ip, proc)


@pytest.fixture(scope="module")
def outside() -> Iterator[dict[str, OtherMachine]]:
    """The "LAN" and "internet" machines (namespaces), plus their listeners."""
    tag = secrets.token_hex(2)
    hosts: dict[str, OtherMachine] = {}
    try:
        hosts["lan"] = build_host(tag, "lan", "192.168.77")
        hosts["internet"] = build_host(tag, "inet", "203.0.113")
        yield hosts
    finally:
        for h in hosts.values():
            h.proc.kill()
            h.proc.wait()
            sh("ip", "netns", "del", h.name, check=False)
            sh("ip", "link", "del", h.veth, check=False)


@pytest.fixture(scope="module")
def host_services() -> Iterator[dict[str, int]]:
    """A Redis stand-in on the host's loopback (PostgreSQL is there already in CI)."""
    redis = 6379 if _free("127.0.0.1", 6379) else free_port()
    proc = listener(redis, "127.0.0.1")
    try:
        yield {"redis": redis}
    finally:
        proc.kill()
        proc.wait()


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def connect_from_sandbox(
    net: MemberNet, tmp_path: Path, targets: list[tuple[str, int]]
) -> dict[str, str]:
    """Run the connect script in a real bubblewrap sandbox inside the member's namespace."""
    work = tmp_path / f"sbx-{net.host_if}-{secrets.token_hex(2)}"
    work.mkdir()
    log = work / "out.log"
    spec = RunSpec(
        argv=[sys.executable, "-c", CONNECT, json.dumps(targets)],
        env={"PATH": "/usr/bin:/bin"},
        cwd=work,
        marker=f"loom-nettest-{secrets.token_hex(4)}",
        name="nettest",
        rw_paths=[work],
        log_path=log,
        netns=net.path,
    )
    handle = BwrapRuntime().spawn(spec)
    deadline = time.monotonic() + 60
    while handle.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    handle.kill_tree(1.0)
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise AssertionError(f"no result from the sandbox:\n{text[-2000:]}")


def nothing_left(manager: NetnsManager, nets: list[MemberNet]) -> None:
    assert not [n for n in netns_names() if n.startswith(manager.agent_tag + "-")]
    links = sh("ip", "-o", "link", "show")
    assert not [n.host_if for n in nets if f" {n.host_if}:" in links or f" {n.host_if}@" in links]
    table = sh("nft", "list", "table", "inet", TABLE, check=False)
    for n in nets:
        assert n.host_if not in table and n.ns_ip not in table, table
    if f" {IF_PREFIX}" not in links:  # no member of any agent left on this machine
        assert table == "", "table inet loom outlives the last member"


# ----------------------------------------------------------------------------- tests


@pytest.mark.skipif(probe_bwrap() is not None, reason=str(probe_bwrap()))
def test_members_reach_their_cluster_and_the_internet_only(
    outside: dict[str, OtherMachine], host_services: dict[str, int], tmp_path: Path
) -> None:
    tag = f"loom-t{secrets.token_hex(3)}"
    manager = NetnsManager(tag, NetnsConfig(egress="internet"))
    closed = NetnsManager(tag, NetnsConfig(egress="none"))
    nets: list[MemberNet] = []
    services: list[subprocess.Popen[bytes]] = []
    try:
        a1 = manager.create("a000000001", "cluster-a")
        nets.append(a1)
        a2 = manager.create("a000000002", "cluster-a")
        nets.append(a2)
        b1 = closed.create("b000000001", "cluster-b")
        nets.append(b1)
        for n in nets:
            services.append(listener(SERVICE_PORT, n.ns_ip, ["nsenter", f"--net={n.path}"]))
        # The agent (host side) reaches its members: the readiness probe, the tunnel.
        assert all(_reachable(n.ns_ip, SERVICE_PORT) for n in nets)
        me = host_address()
        metrics_port = free_port()  # like the agent's metrics port on --metrics-host 0.0.0.0
        services.append(listener(metrics_port, "0.0.0.0"))
        targets = [
            ("127.0.0.1", 5432),
            ("127.0.0.1", host_services["redis"]),
            (me, 5432),
            (a1.host_ip, 5432),
            (me, metrics_port),
            (a1.host_ip, metrics_port),
            (a2.host_ip, metrics_port),
            (LAN_IP, SERVICE_PORT),
            (b1.ns_ip, SERVICE_PORT),
            (a2.ns_ip, SERVICE_PORT),
            (INTERNET_IP, SERVICE_PORT),
        ]
        seen = connect_from_sandbox(a1, tmp_path, targets)
        assert seen[f"{a2.ns_ip}:{SERVICE_PORT}"] == "connected", seen  # same cluster
        assert seen[f"{INTERNET_IP}:{SERVICE_PORT}"] == "connected", seen  # egress internet
        blocked = {k: v for k, v in seen.items() if k.split(":")[0] not in (a2.ns_ip, INTERNET_IP)}
        assert blocked and all(v != "connected" for v in blocked.values()), seen
        # The other cluster's member (egress none): neither cluster a nor the internet.
        seen_b = connect_from_sandbox(
            b1,
            tmp_path,
            [(a1.ns_ip, SERVICE_PORT), (INTERNET_IP, SERVICE_PORT), ("127.0.0.1", 5432)],
        )
        assert all(v != "connected" for v in seen_b.values()), seen_b
    finally:
        for p in services:
            p.kill()
            p.wait()
        for n in nets:
            manager.destroy(n)
    nothing_left(manager, nets)


#: A Ray driver that runs the connect attempts as a task on the cluster's head.
RAY_PROGRAM = textwrap.dedent(
    """
    import json, sys, ray
    ray.init(address=sys.argv[1], logging_level="ERROR")
    @ray.remote(num_cpus=0.1)
    def attempt(targets):
        import socket, concurrent.futures as cf
        def one(t):
            try:
                with socket.create_connection((t[0], t[1]), timeout=2):
                    return "connected"
            except OSError as exc:
                return type(exc).__name__
        with cf.ThreadPoolExecutor(len(targets)) as pool:
            return dict(zip([f"{h}:{p}" for h, p in targets], pool.map(one, targets)))
    print("RESULT " + json.dumps(ray.get(attempt.remote(json.loads(sys.argv[2])), timeout=60)))
    """
)


@pytest.mark.slow
def test_a_ray_task_cannot_reach_host_services_or_the_lan(
    coordinator: CoordinatorThread,
    client: LoomClient,
    outside: dict[str, OtherMachine],
    host_services: dict[str, int],
    tmp_path: Path,
) -> None:
    """A real agent (root: namespaces on) and a real Ray node; the task is the attacker."""
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    metrics = free_port()
    agent = AgentProcess(
        tmp_path / "agent",
        coordinator.url,
        "net0",
        "--price",
        "0.1",
        "--metrics-port",
        str(metrics),
        "--metrics-host",
        "0.0.0.0",
    )
    try:
        wait_for(lambda: any(n.state == "available" for n in client.nodes()), 120, "agent")
        client.create_cluster({"name": "net", "nodes": 1, "resources": {"cpus": 1}})
        cluster = client.wait_cluster("net", timeout=150)
        assert cluster.state == "running", cluster.reason
        head_ip = cluster.head_address.rsplit(":", 1)[0]
        assert not head_ip.startswith("127."), "the head must bind its own namespace address"
        prefix = driver_prefix(cluster.head_address)
        assert prefix, "the head runs in a network namespace of its own"
        assert _reachable("127.0.0.1", metrics), "sanity: the agent's metrics port is up"
        me, api = host_address(), urlsplit(coordinator.url)
        targets = [
            ("127.0.0.1", 5432),
            ("127.0.0.1", host_services["redis"]),
            ("127.0.0.1", metrics),
            (me, 5432),
            (me, metrics),
            (str(ipaddress_before(head_ip)), metrics),  # the host side of the head's veth
            (str(api.hostname), int(api.port or 80)),  # the coordinator's API
            (LAN_IP, SERVICE_PORT),
            (INTERNET_IP, SERVICE_PORT),
        ]
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.ray_token)
        done = subprocess.run(
            [*prefix, sys.executable, "-c", RAY_PROGRAM, cluster.head_address, json.dumps(targets)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        assert lines, done.stderr[-3000:]
        seen = json.loads(lines[-1][len("RESULT ") :])
        assert seen.pop(f"{INTERNET_IP}:{SERVICE_PORT}") == "connected", seen  # default egress
        assert seen and all(v != "connected" for v in seen.values()), seen
        assert client.delete_cluster("net").state == "terminated"
    finally:
        stop_agents([agent])
    tag = agent_tag(tmp_path / "agent" / "agents" / "net0" / "members") + "-"
    assert not [n for n in netns_names() if n.startswith(tag)], "the agent left a namespace"


def ipaddress_before(ip: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(ip) - 1


def test_leftovers_of_a_killed_agent_are_removed() -> None:
    """A restarted agent removes its namespaces (and what still runs in them); an empty
    namespace of an agent that never came back is collected by any other agent."""
    tag = f"loom-{secrets.token_hex(3)}"
    crashed = NetnsManager(tag)
    a = crashed.create("c000000001", "cluster-x")
    inside = listener(SERVICE_PORT, a.ns_ip, ["nsenter", f"--net={a.path}"])  # like Nebula
    restarted = NetnsManager(tag)
    assert a.name in restarted.cleanup_leftovers()
    assert inside.wait(10) != 0  # killed with its namespace
    nothing_left(restarted, [a])
    gone = NetnsManager(f"loom-{secrets.token_hex(3)}")
    b = gone.create("d000000001", "cluster-y")
    with host_lock():
        assert crashed._remove_orphans(min_age_s=0, only=frozenset({b.name})) == [b.name]
    nothing_left(gone, [b])
