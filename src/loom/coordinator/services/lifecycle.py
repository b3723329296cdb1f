"""What happens to a node when its agent connects: the state machine's entry points."""

from __future__ import annotations

import time

from loom.coordinator.services import nodes as node_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import NodeState


async def activate_on_connect(state: CoordinatorState, node_id: str) -> None:
    """A connected node that is registering or back from offline becomes available.

    (Once hardware verification gates placement, new devices stay unplaceable until they
    pass; the node itself can still be `available`.)
    """
    now = time.time()
    async with state.session() as session:
        node = await node_service.get_node(session, node_id)
        current = NodeState(node.state)
        if current in (NodeState.REGISTERING, NodeState.OFFLINE, NodeState.VERIFYING):
            reason = "registered" if current == NodeState.REGISTERING else "reconnected"
            node_service.transition(session, node, NodeState.AVAILABLE, reason, now)
        await session.commit()
