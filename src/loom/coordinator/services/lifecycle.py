"""What happens to a node when its agent connects: the state machine's entry points."""

from __future__ import annotations

import time

from loom.coordinator.services import nodes as node_service
from loom.coordinator.services import verification as verification_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import DeviceState, NodeState


async def activate_on_connect(state: CoordinatorState, node_id: str) -> None:
    """A connected node that is registering or back from offline: `verifying` or `available`.

    A node whose CPU is not verified yet, or that claims a device not yet challenged, goes
    `verifying`; the challenger (``loom.coordinator.challenger``) runs the challenges and
    moves it to `available` once its CPU passed. GPUs that fail only become unplaceable.
    A node back from a long absence (``reverify_after_offline_s``) proves its devices again.
    """
    now = time.time()
    config = verification_service.ChallengerConfig.from_settings(state.settings)
    async with state.session() as session:
        node = await node_service.get_node(session, node_id)
        current = NodeState(node.state)
        if current in (
            NodeState.REGISTERING,
            NodeState.OFFLINE,
            NodeState.DRAINED,
            NodeState.VERIFYING,
        ):
            devices = await verification_service.present_devices(session, [node_id])
            gone_long = (
                current in (NodeState.OFFLINE, NodeState.DRAINED)
                and now - node.state_changed_at > config.reverify_after_offline_s
            )
            if gone_long:
                for dev in devices:
                    if dev.state == DeviceState.VERIFIED.value:
                        dev.state = DeviceState.CLAIMED.value
            reason = "registered" if current == NodeState.REGISTERING else "reconnected"
            if verification_service.needs_verification(node_id, devices):
                node_service.transition(
                    session, node, NodeState.VERIFYING, f"{reason}: hardware challenge", now
                )
            else:
                node_service.transition(session, node, NodeState.AVAILABLE, reason, now)
        await session.commit()
