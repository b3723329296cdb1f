"""What `make demo` shows after `loom up`: the whole path, end to end.

A 3-node Ray cluster on the local agents, a Ray program that runs a task on every node
and prints the distinct node ids, then `cluster down`. Exit 0 only if all of it happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal

from loom.agent.netns import driver_prefix
from loom.client.cli.cluster import print_cost
from loom.client.cli.common import console
from loom.client.cli.costs import cluster_money
from loom.client.sdk import LoomClient, LoomError


def run_demo(client: LoomClient, agents: int) -> int:
    nodes = agents
    name = f"demo-{int(time.time()) % 100000}"
    console.rule("[bold]demo: a Ray cluster on the local agents")
    t0 = time.monotonic()
    try:
        balance = client.balance()
        if Decimal(balance.balance) < 10:
            client.deposit("100")  # the embedded coordinator runs a faucet
            console.print("deposited 100 credits from the embedded faucet")
        cluster = client.create_cluster(
            {"name": name, "nodes": nodes, "resources": {"cpus": 1}, "duration": "15m"}
        )
        console.print(
            f"placed [bold]{cluster.name}[/] on {len(cluster.members)} nodes; starting Ray …"
        )
        cluster = client.wait_cluster(cluster.id, timeout=180)
    except LoomError as exc:
        console.print(f"[red]cluster up failed: {exc}[/]")
        return 1
    if cluster.state != "running":
        console.print(f"[red]cluster {cluster.state}: {cluster.reason}[/]")
        return 1
    console.print(
        f"[green]✓[/] running in {time.monotonic() - t0:.1f} s — head {cluster.head_address}"
    )
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.ray_token)
    console.print("running a Ray program with a task on every node …")
    proc = subprocess.run(
        [
            *driver_prefix(cluster.head_address),  # the head's own network namespace, if any
            sys.executable,
            "-m",
            "loom.examples.spread",
            cluster.head_address,
            str(nodes),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    console.print(proc.stdout.rstrip(), highlight=False)
    if proc.returncode != 0:
        console.print(f"[red]the Ray program failed:[/]\n{proc.stderr[-2000:]}", highlight=False)
    down = client.delete_cluster(cluster.id)
    console.print(f"cluster {down.name}: {down.state}")
    print_cost(cluster_money(client, [down])[down.id])
    ok = proc.returncode == 0 and down.state == "terminated"
    console.rule("[bold green]demo passed" if ok else "[bold red]demo failed")
    return 0 if ok else 1
