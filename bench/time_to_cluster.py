"""Time to cluster: from `cluster up` to every node ready and a trivial task run on each.

Starts a real coordinator and 3 real agents (bubblewrap sandboxes when installed) on this
machine, then for 1, 2 and 3 nodes creates a cluster 5 times and reports medians with the
breakdown the coordinator records (placement, command delivery, `ray start` of the head,
workers joining) plus the time for a driver to run one task on every node.

    .venv/bin/python bench/time_to_cluster.py [--runs 5] [--nodes 1 2 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loom.client.sdk import LoomClient
from loom.protocol.identity import KeyPair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="loom-ttc-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LOOM_HOME=str(home), LOOM_COORDINATOR=url)
    runtime = "bwrap" if shutil.which("bwrap") else "process"
    procs: list[subprocess.Popen[bytes]] = []
    log = open(home / "bench.log", "ab")  # noqa: SIM115
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "loom",
                    "coordinator",
                    "serve",
                    "--port",
                    str(port),
                    "--faucet",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        client = LoomClient(url, KeyPair.generate())
        deadline = time.monotonic() + 60
        while True:
            try:
                client.health()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for i in range(max(args.nodes)):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "loom",
                        "worker",
                        "start",
                        "--name",
                        f"b{i}",
                        "--price",
                        f"0.{i + 1}",
                        "--runtime",
                        runtime,
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
        deadline = time.monotonic() + 300
        while len([n for n in client.nodes() if n.state == "available"]) < max(args.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("agents did not become available (verification?)")
            time.sleep(0.5)
        print(f"time to cluster — runtime {runtime}, {args.runs} runs per size, medians (s)")
        header = (
            f"{'nodes':>5} {'total':>7} {'ready':>7} {'place':>7} {'deliver':>8} "
            f"{'head':>7} {'workers':>8} {'task':>6}"
        )
        print(header)
        for n in args.nodes:
            samples: dict[str, list[float]] = {
                k: [] for k in ("total", "ready", "place", "deliver", "head", "workers", "task")
            }
            for r in range(args.runs):
                name = f"b{n}-{r}"
                t0 = time.monotonic()
                cluster = client.create_cluster(
                    {"name": name, "nodes": n, "resources": {"cpus": 1}, "duration": "10m"}
                )
                while cluster.state not in ("running", "failed"):
                    time.sleep(0.05)
                    cluster = client.cluster(cluster.id)
                t_ready = time.monotonic() - t0
                if cluster.state != "running":
                    raise RuntimeError(f"cluster failed: {cluster.reason}")
                run_env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.ray_token)
                t1 = time.monotonic()
                done = subprocess.run(
                    [sys.executable, "-m", "loom.examples.spread", cluster.head_address, str(n)],
                    env=run_env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                t_task = time.monotonic() - t1
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-2000:])
                client.delete_cluster(cluster.id)
                tm = cluster.timings
                samples["total"].append(t_ready + t_task)
                samples["ready"].append(t_ready)
                samples["place"].append(tm.get("placement_s", 0.0))
                samples["deliver"].append(tm.get("head_delivery_s", 0.0))
                samples["head"].append(tm.get("head_s", 0.0))
                samples["workers"].append(tm.get("workers_s", 0.0))
                samples["task"].append(t_task)
            med = {k: statistics.median(v) for k, v in samples.items()}
            print(
                f"{n:>5} {med['total']:>7.2f} {med['ready']:>7.2f} {med['place'] * 1000:>6.1f}ms "
                f"{med['deliver'] * 1000:>6.1f}ms {med['head']:>7.2f} {med['workers']:>8.2f} "
                f"{med['task']:>6.2f}"
            )
        print("total = ready + task; ready = `cluster up` until every member joined the head")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
