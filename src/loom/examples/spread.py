"""A Ray program that runs a task on every node of a cluster and prints the node ids.

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=… python -m loom.examples.spread HEAD_ADDRESS [EXPECTED]

Exit code 0 only if tasks ran on EXPECTED distinct nodes (when given).
"""

from __future__ import annotations

import logging
import socket
import sys

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0.1)
def where_am_i() -> tuple[str, str]:
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), socket.gethostname()


def main(argv: list[str]) -> int:
    if not argv:
        print(
            "usage: python -m loom.examples.spread HEAD_ADDRESS [EXPECTED_NODES]", file=sys.stderr
        )
        return 2
    address = argv[0]
    expected = int(argv[1]) if len(argv) > 1 else None
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    alive = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    refs = [
        where_am_i.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        ).remote()
        for n in alive
    ]
    seen = sorted({node_id for node_id, _host in ray.get(refs, timeout=60)})
    print(f"tasks ran on {len(seen)} distinct Ray node(s):")
    for node_id in seen:
        print(f"  {node_id}")
    ray.shutdown()
    if expected is not None and len(seen) != expected:
        print(f"expected {expected} nodes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
