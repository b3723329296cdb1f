"""Overlay throughput on the NAT namespace topology (issue 10): overlay vs direct vs relay.

Builds the topology of ``tests/support/nat.py`` (three homes, each behind its own NAT
router; home 3's router is a symmetric NAT), runs a lighthouse + relay on the "public"
address and one Nebula per home (no Ray), then measures TCP throughput, median of N runs:

- **direct**: home 1 -> router 2's public address (the same links and NAT, no overlay);
- **overlay**: home 1 -> home 2 over Nebula (hole-punched through both NATs);
- **relay**: home 1 -> home 3 over Nebula (symmetric NAT: through the coordinator's relay).

Each is measured on the bare veth links (the direct path is then a memory copy: the ratio
is Nebula's CPU cost, not a network's) and with every home's uplink shaped by ``tc tbf``
both ways (models of internet links, ``--shape``), for each Nebula variant of
``--variants`` (:data:`VARIANTS`: a member's config, ``loom.agent.overlay``, and changes to
it). Each line also says how many bytes the coordinator's link received per byte sent
(about 1 when relayed: it comes in once, goes out once; 0 when direct): "overlay" must be
direct.

    sudo .venv/bin/python bench/overlay.py [--runs 5] [--mb 100] [--shape 1gbit,100mbit] \
        [--variants member,mtu1440,routines2]

Needs root, iproute2, nftables and nebula. Ray over the overlay (a 256 MB object, time to
cluster across NAT vs one machine) is measured by bench/overlay_cluster.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from loom.agent.overlay import PUNCH_DELAY, SOCKET_BUFFER, TUN_MTU
from support.nat import SYMMETRIC, Topology

LH_PORT = 14299
SINK_PORT = 9500
TC_ADD = ["ip", "netns", "exec"]
#: This bench's "internet" (not the NAT tests' 203.0.113/24: both can run at once).
PUBLIC = "198.18.9"
#: Changes to a member's Nebula config (a home's), by name. cipher is network-wide
#: (the lighthouse gets it too). mtu8940 needs IP fragmentation on a 1500-byte underlay.
VARIANTS: dict[str, dict[str, object]] = {
    "member": {},
    "systembuffers": {"listen": {"read_buffer": 0, "write_buffer": 0}},  # before 2026-12-01
    "buffers32m": {"listen": {"read_buffer": 32 << 20, "write_buffer": 32 << 20}},
    "mtu1440": {"tun": {"mtu": 1440}},  # 1440 + 60 (IPv4, UDP, Nebula) = 1500
    "mtu8940": {"tun": {"mtu": 8940}},  # carried no TCP at all here (timed out)
    "routines2": {"routines": 2},
    "txqueue5000": {"tun": {"tx_queue": 5000}},
    "chachapoly": {"cipher": "chachapoly"},
}


def tbf(rate: str) -> list[str]:
    return ["tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]


OVERLAY = {1: "10.250.1.1", 2: "10.250.1.2", 3: "10.250.1.3"}

SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print("up", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.sendall(b"k"); c.close()
"""

SOURCE = """
import socket, sys, time
host, port, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = b"x" * (1 << 20)
c = socket.create_connection((host, port), timeout=30)
t0 = time.monotonic()
for _ in range(mb):
    c.sendall(buf)
c.shutdown(socket.SHUT_WR); c.recv(1)
print(mb * 8 / (time.monotonic() - t0))
"""


def ns(name: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{name}"]


def certs(d: Path) -> None:
    def run(*a: str) -> None:
        subprocess.run(["nebula-cert", *a], check=True, capture_output=True, cwd=d)

    run("ca", "-name", "bench")
    run("sign", "-name", "lh", "-ip", "10.250.0.1/16")
    for i, ip in OVERLAY.items():
        run("sign", "-name", f"h{i}", "-ip", f"{ip}/16", "-groups", "c1")


def merged(base: dict[str, object], change: dict[str, object]) -> dict[str, object]:
    out = dict(base)
    for key, value in change.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = {**old, **value}
        else:
            out[key] = value
    return out


def nebula_config(
    topo: Topology, d: Path, name: str, lighthouse: bool, change: dict[str, object]
) -> Path:
    cfg: dict[str, object] = {
        "pki": {
            "ca": str(d / "ca.crt"),
            "cert": str(d / f"{name}.crt"),
            "key": str(d / f"{name}.key"),
        },
        "firewall": {
            "outbound": [{"port": "any", "proto": "any", "host": "any"}],
            "inbound": [] if lighthouse else [{"port": "any", "proto": "any", "group": "c1"}],
        },
        "logging": {"level": "warning"},
    }
    if lighthouse:
        cfg.update(
            static_host_map={},
            lighthouse={"am_lighthouse": True},
            relay={"am_relay": True},
            tun={"disabled": True},
        )
        # The coordinator's (loom.coordinator.overlay.lighthouse), then the variant's
        # cipher and socket buffers (the relay's too).
        cfg["listen"] = {
            "host": topo.coord_ip,
            "port": LH_PORT,
            "read_buffer": SOCKET_BUFFER,
            "write_buffer": SOCKET_BUFFER,
        }
        cfg = merged(cfg, {k: v for k, v in change.items() if k in ("cipher", "listen")})
    else:
        # A member's settings (loom.agent.overlay.member_config), then the variant's.
        cfg.update(
            static_host_map={"10.250.0.1": [f"{topo.coord_ip}:{LH_PORT}"]},
            lighthouse={"hosts": ["10.250.0.1"], "interval": 30},
            listen={
                "host": "0.0.0.0",
                "port": 4242,
                "read_buffer": SOCKET_BUFFER,
                "write_buffer": SOCKET_BUFFER,
            },
            punchy={"punch": True, "respond": True, "delay": PUNCH_DELAY},
            relay={"relays": ["10.250.0.1"], "use_relays": True},
            tun={"dev": "nebula1", "mtu": TUN_MTU},
            handshakes={"try_interval": "100ms", "retries": 20},
        )
        cfg = merged(cfg, change)
    path = d / f"{name}.yml"
    path.write_text(json.dumps(cfg))
    return path


def shape(topo: Topology, rate: str | None) -> None:
    """Model each home's internet link: ``tbf rate`` both ways on every router's uplink
    (router ``wan`` egress = upload, the bridge port's egress = download); None: unshape."""
    for i in (1, 2, 3, 4):
        router = topo.namespaces[topo.namespaces.index(topo.suppliers.get(i, topo.user)) - 1]
        for netns, dev in ((router, "wan"), (topo.inet, f"w{i}")):
            subprocess.run(
                ["ip", "netns", "exec", netns, "tc", "qdisc", "del", "dev", dev, "root"],
                capture_output=True,
            )
            if rate:
                subprocess.run(
                    [*TC_ADD, netns, "tc", "qdisc", "add", "dev", dev, "root", *tbf(rate)],
                    check=True,
                )


def coordinator_rx(topo: Topology) -> int:
    """Bytes the coordinator's link has received (relayed traffic crosses it twice)."""
    out = subprocess.run(
        ["ip", "-s", "-j", "link", "show", f"ltc{topo.tag}"], capture_output=True, text=True
    ).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


def udp_drops(netns: str | None) -> int:
    """UDP datagrams dropped for a full receive buffer in ``netns`` (RcvbufErrors)."""
    if netns is None:
        return 0
    snmp = subprocess.run([*ns(netns), "cat", "/proc/net/snmp"], capture_output=True, text=True)
    names, values = [line.split() for line in snmp.stdout.splitlines() if line.startswith("Udp:")]
    return int(values[names.index("RcvbufErrors")])


def throughput(prefix: list[str], host: str, mb: int) -> float:
    done = subprocess.run(
        [*prefix, sys.executable, "-c", SOURCE, host, str(SINK_PORT), str(mb)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-500:])
    return float(done.stdout.strip())


def measure(
    topo: Topology, d: Path, runs: int, mb: int, change: dict[str, object]
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """One round: a lighthouse and three homes' Nebula, TCP throughput of each path, the
    bytes through the coordinator per byte sent on each, and the UDP datagrams the
    receiving home's Nebula lost to a full socket buffer."""
    procs: list[subprocess.Popen[bytes]] = []
    log = open(d / "nebula.log", "ab")  # noqa: SIM115
    try:
        procs.append(
            subprocess.Popen(
                ["nebula", "-config", str(nebula_config(topo, d, "lh", True, change))],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        for i in OVERLAY:
            cfg = nebula_config(topo, d, f"h{i}", False, change)
            procs.append(
                subprocess.Popen(
                    [*ns(topo.suppliers[i]), "nebula", "-config", str(cfg)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        sinks = [
            (ns(topo.router(2)), f"{topo.public}.12"),
            (ns(topo.suppliers[2]), OVERLAY[2]),
            (ns(topo.suppliers[SYMMETRIC]), OVERLAY[SYMMETRIC]),
        ]
        time.sleep(2)  # the tun devices
        for prefix, host in sinks:
            p = subprocess.Popen(
                [*prefix, sys.executable, "-c", SINK, host, str(SINK_PORT)], stdout=subprocess.PIPE
            )
            assert p.stdout is not None and p.stdout.readline().strip() == b"up"
            procs.append(p)
        src = ns(topo.suppliers[1])
        results: dict[str, list[float]] = {"direct": [], "overlay": [], "relay": []}
        via: dict[str, float] = {}
        drops: dict[str, int] = {}
        receiver = {"direct": None, "overlay": topo.host(2), "relay": topo.host(SYMMETRIC)}
        for name, (_, host) in zip(results, sinks, strict=True):
            try:
                throughput(src, host, 5)  # warm-up: handshakes, relay set-up
                before, dropped = coordinator_rx(topo), udp_drops(receiver[name])
                for _ in range(runs):
                    results[name].append(throughput(src, host, mb))
            except RuntimeError as exc:
                raise RuntimeError(f"{name} (after {results[name]}): {exc}") from None
            via[name] = (coordinator_rx(topo) - before) / (runs * mb * 2**20)
            drops[name] = udp_drops(receiver[name]) - dropped
        return results, via, drops
    finally:
        for p in procs:
            p.kill()
            p.wait()
        log.close()


def report(
    label: str,
    results: dict[str, list[float]],
    via: dict[str, float],
    drops: dict[str, int],
    runs: int,
    mb: int,
) -> None:
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{label}: TCP throughput, median of {runs} x {mb} MB (Mbit/s)")
    for k, v in med.items():
        runs_s = [round(x) for x in results[k]]
        print(
            f"  {k:8s} {v:9.0f}   runs {runs_s}   via coordinator {via[k]:.2f} B/B"
            f"   receiver's UDP buffer drops {drops[k]}"
        )
    print(f"  overlay/direct = {med['overlay'] / med['direct']:.2f} (target >= 0.5)")
    print(f"  relay/direct   = {med['relay'] / med['direct']:.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument(
        "--shape",
        default="1gbit,100mbit",
        help="tc tbf rates of each home's modelled internet link, comma separated ('' = veth only)",
    )
    parser.add_argument(
        "--variants",
        default="member,systembuffers,mtu1440",
        help=f"Nebula variants to compare, of {','.join(VARIANTS)} (member: tun mtu {TUN_MTU})",
    )
    args = parser.parse_args()
    if shutil.which("nebula") is None:
        print("needs nebula (apt-get install nebula)", file=sys.stderr)
        return 2
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    topo = Topology(public=PUBLIC).build()
    topo.open_port(2, SINK_PORT)  # the "direct" sink runs on router 2 itself
    d = Path(tempfile.mkdtemp(prefix="loom-bench-overlay-"))
    try:
        certs(d)
        for rate in [None, *[r for r in args.shape.split(",") if r]]:
            shape(topo, rate)
            link = f"links shaped to {rate} (tbf)" if rate else "veth links (a memory copy)"
            for name in names:
                label = f"{link}, {name} {VARIANTS[name]}"
                try:
                    results, via, drops = measure(topo, d, args.runs, args.mb, VARIANTS[name])
                except RuntimeError as exc:  # a path that carries nothing (a TCP timeout)
                    lines = str(exc).strip().splitlines()
                    print(f"{label}: failed: {lines[0]} ... {lines[-1]}", flush=True)
                    continue
                report(label, results, via, drops, args.runs, args.mb)
        return 0
    finally:
        topo.destroy()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
