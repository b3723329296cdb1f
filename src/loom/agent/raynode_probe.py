"""Ask a Ray GCS whether one node is registered and alive; run as a subprocess.

``python -m loom.agent.raynode_probe --gcs HOST:PORT --node-ip IP --node-manager-port N
[--wait SECONDS]`` prints one JSON line and exits 0 when the node is ALIVE, 1 otherwise.

It runs in its own process because Ray's C++ client caches the auth token per process,
and one agent may host members of several clusters, each with its own token (taken from
``RAY_AUTH_TOKEN`` in this process's environment, never from the command line). A node
is identified by its raylet's address and port, which are unique per member (its port
block). The answer also lists every node id the GCS has ALIVE (``alive_ids``): that is
how one member's agent vouches for the other members (confirmed readiness, billing).
Before building a GCS client (which retries for tens of seconds against a closed
port) it checks that the GCS port accepts TCP connections.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE
_AUTH_ERRORS = ("InvalidAuthToken", "Unauthenticated", "AuthenticationError")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _tcp_open(address: str, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(_split(address), timeout=timeout):
            return True
    except OSError:
        return False


def _find(nodes: dict[Any, Any], node_ip: str, port: int) -> dict[str, Any]:
    found: dict[str, Any] = {"status": "absent", "alive_nodes": 0, "alive_ids": []}
    for node_id, info in nodes.items():
        alive = int(info.state) == ALIVE
        found["alive_nodes"] += int(alive)
        if alive:  # what this node sees of its cluster (confirms the *other* members)
            found["alive_ids"].append(node_id.hex())
        ours = info.node_manager_address == node_ip and int(info.node_manager_port) == port
        if ours and (alive or found["status"] != "alive"):
            found.update(
                status="alive" if alive else "dead",
                node_id=node_id.hex(),
                is_head=bool(info.is_head_node),
            )
    return found


def probe(gcs: str, node_ip: str, port: int, wait: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    client: Any = None
    result: dict[str, Any] = {"status": "unreachable"}
    while True:
        try:
            if client is None and _tcp_open(gcs):
                import ray._raylet  # heavy (~0.3 s): only once the GCS port is open

                client = ray._raylet.GcsClient(address=gcs)  # type: ignore[attr-defined]
            if client is not None:
                result = _find(client.get_all_node_info(timeout=5), node_ip, port)
        except Exception as exc:  # the GCS went away, or refused our token
            error = f"{type(exc).__name__}: {exc}"
            if any(m in error for m in _AUTH_ERRORS):
                return {"status": "unauthenticated", "error": error.splitlines()[0][:300]}
            result = {"status": "unreachable", "error": error.splitlines()[0][:300]}
            client = None
        if result["status"] == "alive" or time.monotonic() >= deadline:
            return result
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gcs", required=True)
    parser.add_argument("--node-ip", required=True)
    parser.add_argument("--node-manager-port", type=int, required=True)
    parser.add_argument("--wait", type=float, default=0.0)
    args = parser.parse_args(argv)
    result = probe(args.gcs, args.node_ip, args.node_manager_port, args.wait)
    print(json.dumps(result), flush=True)
    return 0 if result["status"] == "alive" else 1


if __name__ == "__main__":
    sys.exit(main())
