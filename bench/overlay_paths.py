"""Time to the first packet over a new tunnel, and which path it took, across NATs.

On the NAT topology of ``tests/support/nat.py`` (home 3 behind the symmetric NAT), with a
lighthouse + relay and one Nebula per home as in bench/overlay.py, for each punch-back
delay of ``--delays`` (``punchy.delay``: Nebula's default 1 s was the members' before;
``loom.agent.overlay.PUNCH_DELAY`` now) and ``--reps`` fresh starts (new Nebula processes,
the routers' conntrack flushed), opens tunnels 1 -> 2 (cone to cone), 1 -> 3 (to the
symmetric NAT) and 3 -> 2 (from it) with one ping each. It reports the median round trip
of that first ping (the tunnel's set-up: Nebula holds the packet until the handshake is
done) and how many of the tunnels were direct: a burst of 200 x 1000-byte pings that
crosses the coordinator's link adds under 40 kB there when direct, ~440 kB when relayed.

    sudo .venv/bin/python bench/overlay_paths.py [--reps 5] [--delays 1s,10ms]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from loom.agent.overlay import PUNCH_DELAY
from overlay import OVERLAY, certs, coordinator_rx, nebula_config, ns
from support.nat import SYMMETRIC, Topology

PUBLIC = "198.18.10"
PAIRS = {"cone->cone": (1, 2), "cone->symmetric": (1, SYMMETRIC), "symmetric->cone": (SYMMETRIC, 2)}
BURST = ["-q", "-c", "200", "-i", "0.005", "-s", "1000"]
DIRECT_BYTES = 40_000


def ping(topo: Topology, home: int, ip: str, *args: str) -> str:
    done = subprocess.run(
        [*ns(topo.host(home)), "ping", *args, ip], capture_output=True, text=True, timeout=120
    )
    return done.stdout


def one_start(topo: Topology, d: Path, delay: str) -> dict[str, tuple[float | None, bool]]:
    """Fresh Nebulas: {pair: (first ping's round trip in s or None, direct)}."""
    for i in (1, 2, 3, 4):
        subprocess.run(
            ["ip", "netns", "exec", topo.router(i), "conntrack", "-F"], capture_output=True
        )
    change: dict[str, object] = {"punchy": {"delay": delay}}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        lh = nebula_config(topo, d, "lh", True, change)
        procs.append(subprocess.Popen(["nebula", "-config", str(lh)], stdout=subprocess.DEVNULL))
        for i in OVERLAY:
            cfg = nebula_config(topo, d, f"h{i}", False, change)
            procs.append(
                subprocess.Popen(
                    [*ns(topo.host(i)), "nebula", "-config", str(cfg)], stdout=subprocess.DEVNULL
                )
            )
        time.sleep(2)  # the tun devices, each home's handshake with the lighthouse
        out: dict[str, tuple[float | None, bool]] = {}
        for name, (a, b) in PAIRS.items():
            found = re.search(r"time=([0-9.]+) ms", ping(topo, a, OVERLAY[b], "-c1", "-W20"))
            before = coordinator_rx(topo)
            ping(topo, a, OVERLAY[b], *BURST)
            direct = coordinator_rx(topo) - before < DIRECT_BYTES
            out[name] = (float(found.group(1)) / 1000 if found else None, direct)
        return out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--delays", default=f"1s,{PUNCH_DELAY}")
    args = parser.parse_args()
    if any(shutil.which(tool) is None for tool in ("nebula", "conntrack", "ping")):
        print("needs nebula, conntrack and ping (apt-get install ...)", file=sys.stderr)
        return 2
    topo = Topology(public=PUBLIC).build()
    d = Path(tempfile.mkdtemp(prefix="loom-bench-paths-"))
    try:
        certs(d)
        for delay in [x for x in args.delays.split(",") if x]:
            runs = [one_start(topo, d, delay) for _ in range(args.reps)]
            print(f"punchy.delay {delay}: {args.reps} fresh starts")
            for name in PAIRS:
                times = [r[name][0] for r in runs]
                ok = [t for t in times if t is not None]
                direct = sum(r[name][1] for r in runs)
                med = f"{statistics.median(ok) * 1000:6.0f} ms" if ok else "     -"
                print(
                    f"  {name:16s} first packet median {med} "
                    f"(runs {[round(t * 1000) if t else None for t in times]}), "
                    f"direct {direct}/{args.reps}",
                    flush=True,
                )
        return 0
    finally:
        topo.destroy()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
