"""Which path each tunnel takes across NATs: direct between cone NATs, relayed only for the
member behind the symmetric NAT (real namespaces, real NAT routers, real Nebula).

The topology of ``tests/support/nat.py`` (three homes, each behind its own NAT router; home
3's router is a symmetric NAT), the coordinator's lighthouse + relay (its own code:
:class:`loom.coordinator.overlay.lighthouse.Lighthouse`) on the "public" address, and in
each home a Nebula with a member's config (:func:`loom.agent.overlay.member_config`, its
own key and certificate from the coordinator's authority). No agent, no Ray: what is
checked is the path, by the bytes that cross the coordinator's link while the overlay
carries a burst of datagrams between two homes (a relayed one crosses it, a direct one
never), and what the agent reads from each member's Nebula log
(:meth:`loom.agent.overlay.MemberOverlay.read_tunnels`, what ``member.overlay`` reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.agent.netns import MemberNet, NetnsManager, unavailable_reason
from loom.agent.overlay import TUN_DEVICE, MemberOverlay, generate_key, member_config
from support.nat import SYMMETRIC, Topology, sh
from support.overlay_book import standalone_overlay

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        unavailable_reason() is not None or shutil.which("nebula") is None,
        reason=f"needs root, iproute2, nftables and nebula ({unavailable_reason()})",
    ),
]

#: The "internet" of this test (benchmarking range: no clash with other NAT tests' /24).
PUBLIC = "198.18.7"
#: UDP over the overlay: an echo in the peer's home, and a client that times its first
#: datagram (the tunnel's set-up: Nebula holds it until the handshake is done), then sends a
#: burst of 200 x 1000 bytes, each echoed.
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 7300))
print("up", flush=True)
while True:
    data, peer = s.recvfrom(2048); s.sendto(data, peer)
"""
CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(20)
t0 = time.monotonic(); s.sendto(b"first", (sys.argv[1], 7300)); s.recvfrom(2048)
first = time.monotonic() - t0
s.settimeout(2); echoed = 0
for i in range(200):
    s.sendto(b"x" * 1000, (sys.argv[1], 7300))
    try:
        echoed += len(s.recvfrom(2048)[0]) == 1000
    except TimeoutError:
        pass
print(first, echoed)
"""
#: Bytes on the coordinator's link during a burst: relayed at least (each datagram and its
#: echo cross it, ~440 kB), direct at most (lighthouse chatter only).
RELAYED_BYTES, DIRECT_BYTES = 300_000, 40_000


@pytest.fixture
def topology() -> Iterator[Topology]:
    topo = Topology(public=PUBLIC)
    try:
        yield topo.build()
    finally:
        topo.destroy()


def _coordinator_rx(topo: Topology) -> int:
    out = sh("ip", "-s", "-j", "link", "show", f"ltc{topo.tag}")
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


def _in(topo: Topology, home: int) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{topo.host(home)}", "--"]


def _echo(topo: Topology, home: int, ip: str) -> subprocess.Popen[bytes]:
    echo = subprocess.Popen(
        [*_in(topo, home), sys.executable, "-c", ECHO, ip], stdout=subprocess.PIPE
    )
    assert echo.stdout is not None and echo.stdout.readline().strip() == b"up"
    return echo


def _client(topo: Topology, home: int, ip: str) -> tuple[float, int]:
    """(seconds to the first echo, echoes of the burst's 200) from home ``home`` to ``ip``."""
    done = subprocess.run(
        [*_in(topo, home), sys.executable, "-c", CLIENT, ip],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-1000:]
    first, echoed = done.stdout.split()
    return float(first), int(echoed)


def _nebula(topo: Topology, home: int, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """The member's Nebula in home ``home``'s machine (as the agent runs it in a member's)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{topo.host(home)}",
                "--",
                "nebula",
                "-config",
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _tun_up(topo: Topology, home: int, ip: str) -> bool:
    out = sh(
        "ip", "-n", topo.host(home), "-j", "-4", "addr", "show", "dev", TUN_DEVICE, check=False
    )
    return f'"{ip}"' in out


async def test_cone_nats_get_direct_tunnels_and_only_the_symmetric_one_is_relayed(
    topology: Topology, tmp_path: Path
) -> None:
    stack = contextlib.AsyncExitStack()
    standalone = await stack.enter_async_context(
        standalone_overlay(tmp_path, "10.252.0.0/16", 600.0, host=topology.coord_ip)
    )
    netns = NetnsManager("loom-p0")  # only read_tunnels of MemberOverlay is used
    overlays: dict[int, MemberOverlay] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for home in (1, 2, 3):
            where = tmp_path / f"home{home}"
            public = await asyncio.to_thread(generate_key, where)
            grant = await standalone.book.grant("c1", f"m{home}", None, public)
            net = MemberNet(f"unused-{home}", "unused", "10.201.0.1", "10.201.0.2", "c1", True)
            overlay = overlays[home] = MemberOverlay(grant, net, where, netns)
            (where / "ca.crt").write_text(grant.ca_crt)
            (where / "host.crt").write_text(grant.crt)
            config = where / "config.yml"
            config.write_text(json.dumps(member_config(grant, net, where)))
            procs.append(await asyncio.to_thread(_nebula, topology, home, config, overlay.log_path))
        ip = {home: o.grant.overlay_ip for home, o in overlays.items()}
        deadline = time.monotonic() + 20
        while not all(_tun_up(topology, h, ip[h]) for h in ip):
            assert time.monotonic() < deadline, [o.log_tail() for o in overlays.values()]
            await asyncio.sleep(0.1)
        for home in ip:
            procs.append(await asyncio.to_thread(_echo, topology, home, ip[home]))
        crossed: dict[tuple[int, int], int] = {}
        first: dict[tuple[int, int], float] = {}
        # Cone to cone, cone to symmetric, and the symmetric member opening a tunnel itself.
        for a, b in ((1, 2), (1, SYMMETRIC), (SYMMETRIC, 2)):
            before = _coordinator_rx(topology)
            first[(a, b)], echoed = await asyncio.to_thread(_client, topology, a, ip[b])
            assert echoed >= 190, (a, b, echoed)
            crossed[(a, b)] = _coordinator_rx(topology) - before
        await asyncio.sleep(0.5)  # the last log lines
        peers = {home: dict(o.read_tunnels()) for home, o in overlays.items()}
        print(f"\nfirst datagram (s) {first}; bytes via the coordinator {crossed}; {peers}")
        # The two cone NATs: direct, both ways, and nothing through the coordinator.
        assert crossed[(1, 2)] < DIRECT_BYTES, crossed
        assert peers[1][ip[2]] is False and peers[2][ip[1]] is False, peers
        # The symmetric NAT: the relay carries it, whoever opened the tunnel.
        assert crossed[(1, SYMMETRIC)] > RELAYED_BYTES, crossed
        assert crossed[(SYMMETRIC, 2)] > RELAYED_BYTES, crossed
        assert peers[SYMMETRIC] == {ip[1]: True, ip[2]: True}, peers
        assert peers[1][ip[SYMMETRIC]] and peers[2][ip[SYMMETRIC]], peers
        # What the agents report: only the symmetric member is relayed.
        assert [o.relayed for o in overlays.values()] == [False, False, True]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        await stack.aclose()
