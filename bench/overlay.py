"""Overlay throughput on the NAT namespace topology (issue 10): overlay vs direct vs relay.

Builds the topology of ``tests/support/nat.py`` (three homes, each behind its own NAT
router; home 3's router is a symmetric NAT), runs a lighthouse + relay on the "public"
address and one Nebula per home (no Ray), then measures TCP throughput, median of N runs:

- **direct**: home 1 -> router 2's public address (the same links and NAT, no overlay);
- **overlay**: home 1 -> home 2 over Nebula (hole-punched through both NATs);
- **relay**: home 1 -> home 3 over Nebula (symmetric NAT: through the coordinator's relay).

Each is measured on the bare veth links (the direct path is then a memory copy: the ratio
is Nebula's CPU cost, not a network's) and with every home's uplink shaped by ``tc tbf``
both ways (models of internet links, ``--shape``), for tun MTU 1300 (Nebula's default and a
member's, ``loom.agent.overlay.TUN_MTU``) and 1420 (also with 8 MiB socket buffers).

    sudo .venv/bin/python bench/overlay.py [--runs 5] [--mb 100] [--shape 1gbit,100mbit]

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

from loom.agent.overlay import TUN_MTU
from support.nat import COORD_IP, SYMMETRIC, Topology

LH_PORT = 14299
SINK_PORT = 9500
TC_ADD = ["ip", "netns", "exec"]
#: The socket buffers of the "tuned" variant (Nebula's listen.read_buffer/write_buffer).
SOCKET_BUFFER = 8 << 20


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


def nebula_config(d: Path, name: str, lighthouse: bool, mtu: int, tuned: bool) -> Path:
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
    listen: dict[str, object] = {"host": "0.0.0.0", "port": 4242}
    if tuned:
        listen |= {"read_buffer": SOCKET_BUFFER, "write_buffer": SOCKET_BUFFER}
    if lighthouse:
        cfg.update(
            static_host_map={},
            lighthouse={"am_lighthouse": True},
            listen={**listen, "host": COORD_IP, "port": LH_PORT},
            relay={"am_relay": True},
            tun={"disabled": True},
        )
    else:
        cfg.update(
            static_host_map={"10.250.0.1": [f"{COORD_IP}:{LH_PORT}"]},
            lighthouse={"hosts": ["10.250.0.1"], "interval": 30},
            listen=listen,
            punchy={"punch": True, "respond": True, "delay": "1s"},
            relay={"relays": ["10.250.0.1"], "use_relays": True},
            tun={"dev": "nebula1", "mtu": mtu},
            handshakes={"try_interval": "100ms", "retries": 20},
        )
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
    topo: Topology, d: Path, runs: int, mb: int, mtu: int, tuned: bool
) -> dict[str, list[float]]:
    """One round: a lighthouse and three homes' Nebula, TCP throughput of each path."""
    procs: list[subprocess.Popen[bytes]] = []
    log = open(d / "nebula.log", "ab")  # noqa: SIM115
    try:
        procs.append(
            subprocess.Popen(
                ["nebula", "-config", str(nebula_config(d, "lh", True, mtu, tuned))],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        for i in OVERLAY:
            cfg = nebula_config(d, f"h{i}", False, mtu, tuned)
            procs.append(
                subprocess.Popen(
                    [*ns(topo.suppliers[i]), "nebula", "-config", str(cfg)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        router2 = topo.namespaces[topo.namespaces.index(topo.suppliers[2]) - 1]
        sinks = [
            (ns(router2), "203.0.113.12"),
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
        for name, (_, host) in zip(results, sinks, strict=True):
            throughput(src, host, 5)  # warm-up: handshakes, relay set-up
            for _ in range(runs):
                results[name].append(throughput(src, host, mb))
        return results
    finally:
        for p in procs:
            p.kill()
            p.wait()
        log.close()


def report(label: str, results: dict[str, list[float]], runs: int, mb: int) -> None:
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{label}: TCP throughput, median of {runs} x {mb} MB (Mbit/s)")
    for k, v in med.items():
        print(f"  {k:8s} {v:9.0f}   runs {[round(x) for x in results[k]]}")
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
        "--mtus",
        default="1300,1420",
        help=f"tun MTUs to compare (a member's is {TUN_MTU}); the largest also runs with "
        "8 MiB socket buffers",
    )
    args = parser.parse_args()
    if shutil.which("nebula") is None:
        print("needs nebula (apt-get install nebula)", file=sys.stderr)
        return 2
    topo = Topology().build()
    d = Path(tempfile.mkdtemp(prefix="loom-bench-overlay-"))
    try:
        certs(d)
        mtus = sorted({int(m) for m in args.mtus.split(",") if m})
        for rate in [None, *[r for r in args.shape.split(",") if r]]:
            shape(topo, rate)
            link = f"links shaped to {rate} (tbf)" if rate else "veth links (a memory copy)"
            for mtu in mtus:
                for tuned in (False, True) if mtu == mtus[-1] else (False,):
                    extra = f", socket buffers {SOCKET_BUFFER >> 20} MiB" if tuned else ""
                    label = f"{link}, tun mtu {mtu}{extra}"
                    report(
                        label, measure(topo, d, args.runs, args.mb, mtu, tuned), args.runs, args.mb
                    )
        return 0
    finally:
        topo.destroy()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
