"""Overlay throughput on the NAT namespace topology (issue 10): overlay vs direct vs relay.

Builds the topology of ``tests/support/nat.py`` (three homes, each behind its own NAT
router; home 3's router is a symmetric NAT), runs a lighthouse + relay on the "public"
address and one Nebula per home (no Ray), then measures TCP throughput, median of N runs:

- **direct**: home 1 -> router 2's public address (the same links and NAT, no overlay);
- **overlay**: home 1 -> home 2 over Nebula (hole-punched through both NATs);
- **relay**: home 1 -> home 3 over Nebula (symmetric NAT: through the coordinator's relay).

    sudo .venv/bin/python bench/overlay.py [--runs 5] [--mb 100]

Needs root, iproute2, nftables and nebula. Not measured here (yet): a 256 MB Ray object
between two NAT'd nodes and time to cluster across NAT (tests/integration/
test_overlay_nat.py prints the latter and 50 MB transfers).
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

from support.nat import COORD_IP, SYMMETRIC, Topology

LH_PORT = 14299
SINK_PORT = 9500
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


def nebula_config(d: Path, name: str, lighthouse: bool) -> Path:
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
    }
    if lighthouse:
        cfg.update(
            static_host_map={},
            lighthouse={"am_lighthouse": True},
            listen={"host": COORD_IP, "port": LH_PORT},
            relay={"am_relay": True},
            tun={"disabled": True},
        )
    else:
        cfg.update(
            static_host_map={"10.250.0.1": [f"{COORD_IP}:{LH_PORT}"]},
            lighthouse={"hosts": ["10.250.0.1"], "interval": 30},
            listen={"host": "0.0.0.0", "port": 4242},
            punchy={"punch": True, "respond": True, "delay": "1s"},
            relay={"relays": ["10.250.0.1"], "use_relays": True},
            tun={"dev": "nebula1", "mtu": 1300},
            handshakes={"try_interval": "100ms", "retries": 20},
        )
    path = d / f"{name}.yml"
    path.write_text(json.dumps(cfg))
    return path


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    if shutil.which("nebula") is None:
        print("needs nebula (apt-get install nebula)", file=sys.stderr)
        return 2
    topo = Topology().build()
    procs: list[subprocess.Popen[bytes]] = []
    d = Path(tempfile.mkdtemp(prefix="loom-bench-overlay-"))
    try:
        certs(d)
        log = open(d / "nebula.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                ["nebula", "-config", str(nebula_config(d, "lh", True))],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        for i in OVERLAY:
            cfg = nebula_config(d, f"h{i}", False)
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
            for _ in range(args.runs):
                results[name].append(throughput(src, host, args.mb))
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"TCP throughput, median of {args.runs} x {args.mb} MB (Mbit/s):")
        for k, v in med.items():
            print(f"  {k:8s} {v:9.0f}   runs {[round(x) for x in results[k]]}")
        print(f"  overlay/direct = {med['overlay'] / med['direct']:.2f} (target >= 0.5)")
        print(f"  relay/direct   = {med['relay'] / med['direct']:.2f}")
        return 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
        topo.destroy()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
