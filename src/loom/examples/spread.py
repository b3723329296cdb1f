"""A Ray program that runs a task on every node of a cluster and prints the node ids.

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=… python -m loom.examples.spread HEAD_ADDRESS [EXPECTED]

Exit code 0 only if tasks ran on EXPECTED distinct nodes (when given).
"""

from __future__ import annotations

import logging
import socket
import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0.1)
def where_am_i() -> tuple[str, str]:
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), socket.gethostname()


def _alive() -> list[str]:
    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    return [str(n["NodeID"]) for n in nodes if n.get("Alive")]


def _run_everywhere(expected: int | None, deadline: float) -> list[str]:
    """Run one task pinned to each alive node; retry nodes that turn out to be gone.

    Right after a node dies the head may still list it as alive for a few seconds; a task
    pinned to it then fails as unschedulable. Such nodes are dropped and the list re-read
    until every live node answered (or `expected` did).
    """
    seen: set[str] = set()
    while time.monotonic() < deadline:
        todo = [n for n in _alive() if n not in seen]
        for node_id in todo:
            ref = where_am_i.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
            ).remote()
            try:
                ran_on, _host = ray.get(ref, timeout=30)
            except (ray.exceptions.TaskUnschedulableError, ray.exceptions.GetTimeoutError):
                continue
            seen.add(ran_on)
        if (len(seen) >= expected) if expected is not None else not todo:
            break
        time.sleep(1.0)
    return sorted(seen)


def main(argv: list[str]) -> int:
    if not argv:
        print(
            "usage: python -m loom.examples.spread HEAD_ADDRESS [EXPECTED_NODES]", file=sys.stderr
        )
        return 2
    address = argv[0]
    expected = int(argv[1]) if len(argv) > 1 else None
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    seen = _run_everywhere(expected, deadline=time.monotonic() + 120)
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
