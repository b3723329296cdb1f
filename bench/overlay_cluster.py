"""Ray over the overlay (issue 10): time to cluster across NAT vs on one machine, and a
256 MB Ray object between two NAT'd nodes. Median of N.

A real coordinator (in this process, SQLite, lighthouse + relay on the "public" address),
real agents, real Ray, each member in its own namespace with its own Nebula:

- **nat**: three agents, each in its own home behind its own NAT router (the topology of
  ``tests/support/nat.py``; home 3 is a symmetric NAT, so its member is relayed);
- **one machine**: three agents in this host's own network namespace (members still get
  their own namespaces and Nebula; the lighthouse is reached over each member's veth).

For each: ``cluster up`` (create -> running, 3 members ready) N times, then on the NAT
cluster a driver in the head's namespace moves a 256 MB object from worker A's node to
worker B's (both NAT'd; B may be the relayed one) N times.

    sudo .venv/bin/python bench/overlay_cluster.py [--runs 5] [--mb 256]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from loom.agent.netns import driver_prefix, unavailable_reason
from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.config import Settings
from loom.protocol.identity import KeyPair
from support.nat import COORD_IP, Topology
from support.servers import CoordinatorThread, agent_env, free_port, wait_for

MOVE = textwrap.dedent(
    """
    import sys, time, numpy as np, ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Pin
    ray.init(address=sys.argv[1], logging_level="ERROR")
    mb, runs = int(sys.argv[2]), int(sys.argv[3])
    by_ip = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
    src, dst = by_ip[sys.argv[4]], by_ip[sys.argv[5]]
    @ray.remote(num_cpus=0.1)
    def make():
        return np.ones(mb * 1024 * 1024, dtype=np.uint8)
    @ray.remote(num_cpus=0.1)
    def total(a):
        return int(a[::4096].sum())
    for _ in range(runs + 1):  # the first one warms the workers up
        ref = make.options(scheduling_strategy=Pin(src, soft=False)).remote()
        ray.wait([ref], fetch_local=False)
        t0 = time.monotonic()
        ray.get(total.options(scheduling_strategy=Pin(dst, soft=False)).remote(ref))
        print("MOVED", time.monotonic() - t0, flush=True)
        del ref
    """
)


def start_agents(
    url: str, root: Path, where: list[str | None], prefix: str
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i, netns in enumerate(where):
        home = root / f"{prefix}{i}"
        home.mkdir(parents=True)
        enter = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        cmd = [sys.executable, "-m", "loom", "worker", "start", "--name", f"{prefix}{i}"]
        procs.append(
            subprocess.Popen(
                [*enter, *cmd, "--coordinator", url],
                env=agent_env(home, url),
                stdout=open(home / "agent.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cluster_up(
    client: LoomClient, name: str, runs: int
) -> tuple[list[float], list[dict[str, float]], list[str]]:
    """``runs`` clusters up (the last one is left running); failures are counted, not hidden."""
    times, timings, failures = [], [], []
    for r in range(runs):
        # The previous cluster ends first: each run places on the same free agents (one
        # whose CPU challenge verified only some of its cores has room for one member).
        if r and client.cluster(f"{name}{r - 1}").state == "running":
            client.delete_cluster(f"{name}{r - 1}")
        deadline = time.monotonic() + 180
        while True:  # a failed member's node is freed (or judged) a moment after it failed
            t0 = time.monotonic()
            try:
                client.create_cluster({"name": f"{name}{r}", "nodes": 3, "resources": {"cpus": 1}})
                break
            except LoomAPIError as exc:
                if exc.code != "no_capacity" or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        cluster = client.wait_cluster(f"{name}{r}", timeout=300)
        if cluster.state != "running":
            failures.append(cluster.reason[:300])  # a failed cluster has already ended
            continue
        times.append(time.monotonic() - t0)
        timings.append(cluster.timings)
    return times, timings, failures


_STEP = re.compile(r"\(([a-z]+)\) ready in ([0-9.]+) s: (.*)$")


def steps(root: Path, prefix: str) -> str:
    """Median seconds of each step of a member's start, from the agents' logs, by role."""
    found: dict[str, dict[str, list[float]]] = {}
    for log in root.glob(f"{prefix}*/agent.log"):
        for line in log.read_text(errors="replace").splitlines():
            m = _STEP.search(line)
            if not m:
                continue
            role = found.setdefault(m.group(1), {})
            role.setdefault("total", []).append(float(m.group(2)))
            for part in m.group(3).split(", "):
                key, value, _ = part.split(" ")
                role.setdefault(key, []).append(float(value))
    return "; ".join(
        f"{role}: " + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in parts.items())
        for role, parts in sorted(found.items())
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=256)
    args = parser.parse_args()
    if unavailable_reason() is not None or shutil.which("nebula") is None:
        print(f"needs root, nebula, ip, nft ({unavailable_reason()})", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="loom-bench-cluster-"))
    os.environ["LOOM_HOME"] = str(tmp / "coordinator")
    topo = Topology().build()
    udp = free_port()
    settings = Settings(
        db_url=f"sqlite:///{tmp / 'loom.db'}",
        host=COORD_IP,
        port=free_port(),
        faucet=True,
        tune_gc=False,
        restart_grace_s=0.0,
        # Not measured here: hardware verification (slow on a loaded 2-core machine).
        require_verified=False,
        overlay_listen=f"{COORD_IP}:{udp}",
        overlay_dir=str(tmp / "overlay"),
    )
    coordinator = CoordinatorThread(settings).start()
    url = coordinator.url
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with LoomClient(url, KeyPair.generate()) as client:
            client.request("POST", "/v1/credits/deposit", json={"amount": "100000"})
            results: dict[str, list[float]] = {}
            for label, where in (
                ("one machine", [None, None, None]),
                ("nat", [topo.suppliers[1], topo.suppliers[2], topo.suppliers[3]]),
            ):
                prefix = "m" if where[0] is None else "h"
                procs = start_agents(url, tmp, where, prefix)
                wait_for(
                    lambda p=prefix: (
                        len(  # type: ignore[misc]
                            [
                                n
                                for n in client.nodes()
                                if n.name.startswith(p) and n.state == "available"
                            ]
                        )
                        == 3
                    ),
                    600,
                    f"3 agents ({label})",
                )
                times, timings, failures = cluster_up(client, prefix, args.runs)
                results[label] = times
                print(
                    f"cluster up, 3 members ready, {label}: median "
                    f"{statistics.median(times) if times else float('nan'):.1f} s, runs "
                    f"{[round(t, 1) for t in times]}, failed {len(failures)} {failures}"
                )
                print(f"  coordinator timings of the last: {timings[-1] if timings else {}}")
                print(f"  agents' steps (median): {steps(tmp, prefix)}", flush=True)
                if label == "nat" and times:
                    cluster = next(
                        client.cluster(c.name)
                        for c in client.clusters()
                        if c.name.startswith(prefix) and c.state == "running"
                    )
                    workers = [m for m in cluster.members if m.role == "worker"]
                    src, dst = workers[0].overlay_ip, workers[1].overlay_ip
                    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.ray_token)
                    done = subprocess.run(
                        [
                            *driver_prefix(cluster.head_address),
                            sys.executable,
                            "-c",
                            MOVE,
                            cluster.head_address,
                            str(args.mb),
                            str(args.runs),
                            src,
                            dst,
                        ],
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=900,
                    )
                    if done.returncode != 0:
                        print(done.stderr[-3000:], file=sys.stderr)
                        return 1
                    moved = [float(x.split()[1]) for x in done.stdout.splitlines()[1:]]
                    relayed = [m.node_name for m in cluster.members if m.relayed]
                    print(
                        f"{args.mb} MB Ray object between two NAT'd workers "
                        f"({workers[0].node_name} -> {workers[1].node_name}; relayed: "
                        f"{relayed or 'none'}): median {statistics.median(moved):.2f} s "
                        f"= {args.mb * 8 / statistics.median(moved):.0f} Mbit/s, runs "
                        f"{[round(t, 2) for t in moved]}",
                        flush=True,
                    )
                for c in client.clusters():
                    if c.name.startswith(prefix) and c.state == "running":
                        client.delete_cluster(c.name)
                stop(procs)
                procs = []
            if results["nat"] and results["one machine"]:
                gap = statistics.median(results["nat"]) - statistics.median(results["one machine"])
                print(f"nat - one machine = {gap:+.1f} s (target: within 2 s)")
        return 0
    finally:
        stop(procs)
        coordinator.stop()
        topo.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
