"""Which path each tunnel takes across NATs: direct between cone NATs, relayed only for the
member behind the symmetric NAT (real namespaces, real NAT routers, real Nebula).

The topology of ``tests/support/nat.py`` (three homes, each behind its own NAT router; home
3's router is a symmetric NAT), the coordinator's lighthouse + relay (its own code:
:class:`loom.coordinator.overlay.lighthouse.Lighthouse`) on the "public" address, and in
each home a Nebula with a member's config (:func:`loom.agent.overlay.member_config`, its
own key and certificate from the coordinator's authority). No agent, no Ray: what is
checked is the path, by the bytes that cross the coordinator's link while the overlay
carries a burst of pings between two homes (a relayed packet crosses it twice, a direct
one never), and what the agent reads from each member's Nebula log
(:meth:`loom.agent.overlay.MemberOverlay.read_tunnels`, what ``member.overlay`` reports).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.agent.netns import MemberNet, NetnsManager, unavailable_reason
from loom.agent.overlay import TUN_DEVICE, MemberOverlay, generate_key, member_config
from loom.coordinator.overlay.authority import Authority, OverlaySettings
from loom.coordinator.overlay.lighthouse import Lighthouse
from support.nat import SYMMETRIC, Topology, sh
from support.servers import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        unavailable_reason() is not None or shutil.which("nebula") is None,
        reason=f"needs root, iproute2, nftables and nebula ({unavailable_reason()})",
    ),
]

#: The "internet" of this test (benchmarking range: no clash with other NAT tests' /24).
PUBLIC = "198.18.7"
#: A burst of pings over the overlay: 200 x 1000 bytes each way.
BURST = ["-q", "-c", "200", "-i", "0.005", "-s", "1000"]
#: Bytes on the coordinator's link during a burst: relayed at least (each packet twice
#: there, ~440 kB), direct at most (lighthouse chatter only).
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


def _ping(topo: Topology, home: int, ip: str, *args: str) -> str:
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{topo.host(home)}", "ping", *args, ip],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout


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


@pytest.mark.skipif(shutil.which("ping") is None, reason="needs ping (iputils-ping)")
async def test_cone_nats_get_direct_tunnels_and_only_the_symmetric_one_is_relayed(
    topology: Topology, tmp_path: Path
) -> None:
    udp = free_port()
    authority = Authority(
        OverlaySettings(
            listen=f"{topology.coord_ip}:{udp}",
            advertise=f"{topology.coord_ip}:{udp}",
            network="10.252.0.0/16",
            data_dir=tmp_path / "overlay",
            cert_lifetime_s=600.0,
        )
    )
    lighthouse = Lighthouse(authority)
    await lighthouse.start()
    supervisor = asyncio.create_task(lighthouse.run())
    netns = NetnsManager("loom-p0")  # only read_tunnels of MemberOverlay is used
    overlays: dict[int, MemberOverlay] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for home in (1, 2, 3):
            where = tmp_path / f"home{home}"
            public = await asyncio.to_thread(generate_key, where)
            grant = await asyncio.to_thread(authority.grant, "c1", f"m{home}", None, public)
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
        crossed: dict[tuple[int, int], int] = {}
        first: dict[tuple[int, int], float] = {}
        # Cone to cone, cone to symmetric, and the symmetric member opening a tunnel itself.
        for a, b in ((1, 2), (1, SYMMETRIC), (SYMMETRIC, 2)):
            reply = await asyncio.to_thread(_ping, topology, a, ip[b], "-c", "1", "-W", "20")
            found = re.search(r"time=([0-9.]+) ms", reply)
            assert found, (a, b, reply, overlays[a].log_tail(10))
            first[(a, b)] = float(found.group(1))  # the tunnel's set-up is in this one
            before = _coordinator_rx(topology)
            burst = await asyncio.to_thread(_ping, topology, a, ip[b], *BURST)
            assert " 0% packet loss" in burst, burst
            crossed[(a, b)] = _coordinator_rx(topology) - before
        await asyncio.sleep(0.5)  # the last log lines
        peers = {home: dict(o.read_tunnels()) for home, o in overlays.items()}
        print(f"\nfirst packet (ms) {first}; bytes via the coordinator {crossed}; {peers}")
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
        supervisor.cancel()
        with pytest.raises(asyncio.CancelledError):
            await supervisor
