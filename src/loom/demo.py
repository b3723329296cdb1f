"""What `make demo` shows after `loom up`: the network working end to end."""

from __future__ import annotations

from loom.client.cli.common import console
from loom.client.sdk import LoomClient


def run_demo(client: LoomClient, agents: int) -> int:
    """Check the embedded network end to end; return the exit code."""
    nodes = [n for n in client.nodes() if n.name.startswith("local-") and n.state == "available"]
    if len(nodes) < agents:
        console.print(f"[red]only {len(nodes)} of {agents} nodes are available[/]")
        return 1
    console.print(f"[green]demo: {len(nodes)} nodes registered and heart-beating[/]")
    return 0
