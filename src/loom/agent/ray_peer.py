"""Tell a Ray head's GCS that one of its nodes is dead; run as a subprocess.

``python -m loom.agent.ray_peer --gcs HOST:PORT --node-id HEX [--reason TEXT]`` prints
one JSON line and exits 0 once the GCS lists the node DEAD (``{"status": "dead",
"was": "alive"|"dead"|"absent", "node_ip": ..., "took_s": ...}``), 1 otherwise.

Why: when Loom declares a member lost (its agent went offline, its host was cut off), the
head's GCS still believes the node ALIVE until its own health checks give up, and the
cluster's drivers keep leasing workers from, and pushing tasks to, a raylet nobody can
reach. The agent of the *head* member runs this module inside the head's network
namespace (where the GCS listens on its overlay address) so the GCS forgets the node at
once: every task and actor on it fails over (retries, restarts) right away.

How: the GCS's own ``NodeInfoGcsService.UnregisterNode`` RPC, the one a raylet sends when
it stops on purpose, with ``NodeDeathInfo(UNEXPECTED_TERMINATION, reason)``. The GCS marks
the node DEAD, publishes that to every raylet and driver, and removes its resources,
without needing to reach the lost raylet. (Ray's drain APIs are no use here: both ask the
raylet itself to drain or shut down, and that raylet is the one that cannot be reached.)
If the node comes back after all (a partition that healed), its raylet learns from the
GCS that it is dead and exits; the coordinator has replaced it by then.

Like :mod:`loom.agent.raynode_probe` it runs in its own process because Ray's client
caches the auth token per process: the token comes from ``RAY_AUTH_TOKEN`` in this
process's environment, never from the command line. A fixed module with arguments, never
generated code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
from typing import Any

from loom.agent.raynode_probe import _AUTH_ERRORS, _tcp_open

ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE
_NODE_ID = re.compile(r"^[0-9a-f]{56}$")
#: What the head's GCS and the drivers' logs will show as the node's death reason.
MAX_REASON = 200


def _state_of(client: Any, node_id: str) -> tuple[str, str]:
    """(alive | dead | absent, its IP): the GCS's view of ``node_id`` (hex)."""
    for nid, info in client.get_all_node_info(timeout=5).items():
        if nid.hex() == node_id:
            state = "alive" if int(info.state) == ALIVE else "dead"
            return state, str(info.node_manager_address)
    return "absent", ""


def _unregister(gcs: str, node_id: str, reason: str, timeout: float) -> None:
    from ray._private.gcs_utils import create_gcs_channel  # heavy: after the port check

    # Generated protobuf modules (untyped): looked up as plain modules.
    common_pb2 = importlib.import_module("ray.core.generated.common_pb2")
    gcs_service_pb2 = importlib.import_module("ray.core.generated.gcs_service_pb2")
    gcs_service_pb2_grpc = importlib.import_module("ray.core.generated.gcs_service_pb2_grpc")
    channel = create_gcs_channel(gcs)  # with Ray's token interceptor (RAY_AUTH_TOKEN)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        death = common_pb2.NodeDeathInfo(
            reason=common_pb2.NodeDeathInfo.UNEXPECTED_TERMINATION, reason_message=reason
        )
        request = gcs_service_pb2.UnregisterNodeRequest(
            node_id=bytes.fromhex(node_id), node_death_info=death
        )
        stub.UnregisterNode(request, timeout=timeout)
    finally:
        channel.close()


def mark_dead(gcs: str, node_id: str, reason: str, timeout: float = 10.0) -> dict[str, Any]:
    """Make the GCS at ``gcs`` list ``node_id`` DEAD; returns what happened (JSON-able)."""
    if not _NODE_ID.match(node_id):
        return {"status": "error", "error": f"not a Ray node id (56 hex digits): {node_id!r}"}
    t0 = time.monotonic()
    if not _tcp_open(gcs, timeout=min(2.0, timeout)):
        return {"status": "unreachable", "error": f"GCS at {gcs} does not accept connections"}
    try:
        import ray._raylet

        client = ray._raylet.GcsClient(address=gcs)  # type: ignore[attr-defined]
        was, node_ip = _state_of(client, node_id)
        if was == "alive":
            _unregister(gcs, node_id, reason[:MAX_REASON], timeout)
            deadline = t0 + timeout
            while _state_of(client, node_id)[0] == "alive":
                if time.monotonic() >= deadline:
                    return {"status": "alive", "was": was, "error": "the GCS still lists it"}
                time.sleep(0.1)
    except Exception as exc:  # the GCS went away, or refused our token
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if any(m in error for m in _AUTH_ERRORS):
            return {"status": "unauthenticated", "error": error}
        return {"status": "unreachable", "error": error}
    # "absent": the GCS never knew it (or forgot it): nothing will be scheduled there.
    took = round(time.monotonic() - t0, 3)
    return {"status": "dead", "was": was, "node_ip": node_ip, "took_s": took}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gcs", required=True, help="host:port of the head's GCS")
    parser.add_argument("--node-id", required=True, help="hex id of the lost Ray node")
    parser.add_argument("--reason", default="lost (declared by Loom)")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = mark_dead(args.gcs, args.node_id.lower(), args.reason, args.timeout)
    print(json.dumps(result), flush=True)
    return 0 if result["status"] == "dead" else 1


if __name__ == "__main__":
    sys.exit(main())
