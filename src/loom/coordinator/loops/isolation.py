"""Per-item isolation for the background loops: one row's failure never stops a loop.

Every reconciler (settlement, teardown, healing, challenges, watchdog) walks a list of rows
and acts on each. An exception on one of them (a poisoned row, a bug reached by one odd
record) is caught here, logged with the loop and the item, counted in
``loom_loop_item_errors_total{loop=...}``, and optionally recorded on the row itself; the
loop then carries on with the next item::

    for cluster_id in cluster_ids:
        async with isolated("settlement", cluster_id, record=note_on_cluster(state, cid)):
            ...

Cancellation is never swallowed. A recorder is called once per distinct error message of
an item (a row that fails every tick is not written every tick) and its own failure is
only logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from loom.coordinator.db.models import Cluster, ClusterEvent, Node, NodeEvent
from loom.coordinator.metrics import count_loop_item_error
from loom.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)

Recorder = Callable[[str], Awaitable[None]]

#: The last error recorded per (loop, item), so a recurring one is written once.
_last_recorded: dict[tuple[str, str], str] = {}
_MAX_REMEMBERED = 10_000


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:240] if text else type(exc).__name__


@contextlib.asynccontextmanager
async def isolated(loop: str, item: str, *, record: Recorder | None = None) -> AsyncIterator[None]:
    """Run the body for one item; an exception is logged, counted, recorded, and swallowed."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("loop %s: item %s failed (the loop goes on with the others)", loop, item)
        count_loop_item_error(loop)
        message = describe(exc)
        key = (loop, item)
        if record is not None and _last_recorded.get(key) != message:
            if len(_last_recorded) >= _MAX_REMEMBERED:
                _last_recorded.clear()
            _last_recorded[key] = message
            try:
                await record(message)
            except Exception:
                log.exception("loop %s: could not record the error on %s", loop, item)


def on_cluster(state: CoordinatorState, loop: str, cluster_id: str) -> Recorder:
    """Record a loop's error on the cluster's timeline (an event that keeps its state)."""

    async def record(message: str) -> None:
        async with state.session() as session:
            cluster = await session.get(Cluster, cluster_id)
            if cluster is None:
                return
            session.add(
                ClusterEvent(
                    cluster_id=cluster_id,
                    at=time.time(),
                    from_state=cluster.state,
                    to_state=cluster.state,
                    reason=f"{loop} error (retried every tick): {message}",
                )
            )
            await session.commit()

    return record


def on_node(state: CoordinatorState, loop: str, node_id: str) -> Recorder:
    """Record a loop's error on the node's timeline (an event that keeps its state)."""

    async def record(message: str) -> None:
        async with state.session() as session:
            node = await session.get(Node, node_id)
            if node is None:
                return
            session.add(
                NodeEvent(
                    node_id=node_id,
                    at=time.time(),
                    from_state=node.state,
                    to_state=node.state,
                    reason=f"{loop} error: {message}"[:255],
                )
            )
            await session.commit()

    return record
