"""When Loom declares a member lost, tell the cluster's Ray head at once.

Loom notices a lost member (its agent went offline, its host was cut off, its Ray node
died) in seconds; Ray's head, left alone, only after its own health checks give up, and
the cluster's drivers keep leasing workers on the lost node and waiting on tasks pushed
to it until then. So when a member is marked lost (``loops/cluster_events.member_lost``
calls :func:`tell_head`), the head member's agent gets a typed
:class:`~loom.protocol.commands.MemberPeerLost`: its agent has the head's GCS mark the lost
member's Ray node dead (``loom.agent.ray_peer``, inside the head's network namespace, where
the GCS listens on its overlay address). Ray then fails over every task and actor that was
on it, and the replacement Loom places joins the same head.

Best effort and off the loss's own path: :func:`tell_head` starts a background task and
returns; a head that cannot be reached (or is itself the lost member) changes nothing, and
Ray's own health checks (tuned to the overlay in ``loom.agent.raynode_spec``) remain the
fallback. Every outcome is logged and counted in :data:`TOLD`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import select

from loom.coordinator.db.models import Member
from loom.coordinator.hub import AgentNotConnected, CommandFailed
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import MemberState
from loom.protocol.commands import MemberPeerLost, MemberPeerLostReply

log = logging.getLogger(__name__)

#: The agent runs a subprocess that imports Ray and talks to the GCS (~1-3 s, more on a
#: loaded machine); past this the command is given up (Ray's health checks still work).
PEER_LOST_TIMEOUT_S = 30.0
#: Outcomes since start (``dead``, ``no_head``, ``no_ray_node``, ``unreachable``, ...).
TOLD: Counter[str] = Counter()


@dataclass(frozen=True)
class HeadTarget:
    """Who to tell: the head member and its node, and the lost member's Ray node id."""

    head_member_id: str
    head_node_id: str
    ray_node_id: str


async def target_for(state: CoordinatorState, lost_member_id: str) -> HeadTarget | str:
    """The head to tell about ``lost_member_id``, or why there is none."""
    async with state.session() as session:
        lost = await session.get(Member, lost_member_id)
        if lost is None:
            return "no_member"
        if lost.role == "head":
            return "head_lost"  # the cluster fails; there is no other GCS to tell
        if not lost.ray_node_id:
            return "no_ray_node"  # it never registered with the head
        head = await session.scalar(
            select(Member).where(
                Member.cluster_id == lost.cluster_id,
                Member.role == "head",
                Member.state == MemberState.READY.value,
            )
        )
        if head is None or head.state not in cluster_service.LIVE_MEMBER:
            return "no_head"
        return HeadTarget(head.id, head.node_id, lost.ray_node_id)


async def tell_head_now(
    state: CoordinatorState, lost_member_id: str, reason: str
) -> MemberPeerLostReply | str:
    """Send the head's agent :class:`MemberPeerLost`; returns its reply or why not."""
    target = await target_for(state, lost_member_id)
    if isinstance(target, str):
        return target
    if not state.agents.reachable(target.head_node_id):
        return "head_unreachable"
    command = MemberPeerLost(
        member_id=target.head_member_id,
        ray_node_id=target.ray_node_id,
        reason=f"Loom declared member {lost_member_id} lost: {reason}"[:300],
    )
    try:
        return await state.agents.member_peer_lost(
            target.head_node_id, command, timeout=PEER_LOST_TIMEOUT_S
        )
    except (AgentNotConnected, CommandFailed) as exc:
        log.warning("telling the head of %s's loss failed: %s", lost_member_id, exc)
        return "failed"


async def _tell(state: CoordinatorState, lost_member_id: str, reason: str) -> None:
    try:
        result = await tell_head_now(state, lost_member_id, reason)
    except Exception:  # never let this break the loss handling around it
        log.exception("telling the head about %s failed", lost_member_id)
        TOLD["error"] += 1
        return
    if isinstance(result, str):
        TOLD[result] += 1
        log.info("head not told of %s's loss: %s", lost_member_id, result)
        return
    TOLD[result.status or "unknown"] += 1
    log.info(
        "head's GCS told of %s's loss: %s (was %s, %s s) %s",
        lost_member_id,
        result.status,
        result.was,
        result.took_s,
        result.error,
    )


def tell_head(state: CoordinatorState, lost_member_id: str, reason: str) -> None:
    """Start telling the head's GCS that ``lost_member_id`` is gone; returns at once.

    Call after the member's ``lost`` state is committed."""
    state.track(
        asyncio.get_running_loop().create_task(
            _tell(state, lost_member_id, reason), name=f"peer-lost-{lost_member_id}"
        )
    )
