"""Reliability scores of nodes, from what the database knows (``loom.core.reliability``).

Facts over the scoring window (the last 30 days):

* **uptime** from the node's state timeline (``node_events``): time in ``verifying``,
  ``available`` or ``allocated`` versus time since it registered (within the window);
* **heartbeats**: heartbeats are counted, not stored one by one (they are batched, see
  ``services.heartbeats``), so the gap figure is the mean gap while online
  (online time / heartbeats), an approximation of the 95th percentile; long silences show
  up as offline time in uptime anyway;
* **challenges**: passed and failed hardware challenges (errors and interrupted ones are
  not held against the node), with their ages;
* **clusters**: members released normally versus members lost.

Four queries per chunk of 1,000 node ids (``db.batching``), whatever the number of nodes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import DeviceChallenge, Member, Node, NodeEvent
from loom.core.models import MemberState, NodeState
from loom.core.reliability import ChallengeResult, ReliabilityInputs, score

WINDOW_S = 30 * 86_400.0
ONLINE_STATES = frozenset(
    {NodeState.VERIFYING.value, NodeState.AVAILABLE.value, NodeState.ALLOCATED.value}
)


def online_seconds(
    events: Sequence[tuple[float, str]], start: float, end: float, initial: str = ""
) -> float:
    """Seconds in [start, end] spent in an online state, from (at, to_state) events."""
    total = 0.0
    current, since = initial, start
    for at, to_state in events:
        seg_end = min(at, end)
        if current in ONLINE_STATES and seg_end > since:
            total += seg_end - since
        current, since = to_state, max(at, since)
    if current in ONLINE_STATES and end > since:
        total += end - since
    return total


async def node_inputs(
    session: AsyncSession,
    node_ids: Sequence[str],
    *,
    now: float,
    heartbeat_interval_s: float = 5.0,
) -> dict[str, ReliabilityInputs]:
    out: dict[str, ReliabilityInputs] = {}
    for ids in chunks(node_ids):  # bounded IN-lists, whatever the network's size
        out.update(await _chunk_inputs(session, ids, now, heartbeat_interval_s))
    return out


async def _chunk_inputs(
    session: AsyncSession, ids: list[str], now: float, heartbeat_interval_s: float
) -> dict[str, ReliabilityInputs]:
    since = now - WINDOW_S
    nodes = (  # the three columns scoring reads, not whole ORM rows
        await session.execute(
            select(Node.id, Node.registered_at, Node.heartbeats).where(Node.id.in_(ids))
        )
    ).all()
    timeline: dict[str, list[tuple[float, str]]] = defaultdict(list)
    rows = await session.execute(
        select(NodeEvent.node_id, NodeEvent.at, NodeEvent.to_state)
        .where(NodeEvent.node_id.in_(ids))
        .order_by(NodeEvent.node_id, NodeEvent.at, NodeEvent.id)
    )
    for node_id, at, to_state in rows:
        timeline[node_id].append((at, to_state))
    challenges: dict[str, list[ChallengeResult]] = defaultdict(list)
    crow = await session.execute(
        select(DeviceChallenge.node_id, DeviceChallenge.ended_at, DeviceChallenge.outcome).where(
            DeviceChallenge.node_id.in_(ids),
            DeviceChallenge.ended_at >= since,
            DeviceChallenge.outcome.in_(("passed", "failed")),
        )
    )
    for node_id, ended_at, outcome in crow:
        challenges[node_id].append(
            ChallengeResult(age_s=max(0.0, now - ended_at), passed=outcome == "passed")
        )
    members: dict[tuple[str, str], int] = {}
    mrow = await session.execute(
        select(Member.node_id, Member.state, func.count())
        .where(
            Member.node_id.in_(ids),
            Member.state.in_((MemberState.LOST.value, MemberState.RELEASED.value)),
        )
        .group_by(Member.node_id, Member.state)
    )
    for node_id, member_state, count in mrow:
        members[(node_id, member_state)] = int(count)

    out: dict[str, ReliabilityInputs] = {}
    for node in nodes:
        start = max(since, node.registered_at)
        observed = max(0.0, now - start)
        online = min(observed, online_seconds(timeline.get(node.id, []), start, now))
        gaps = max(0, node.heartbeats - 1)
        mean_gap = online / gaps if gaps else None
        out[node.id] = ReliabilityInputs(
            observed_s=observed,
            online_s=online,
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_gaps=gaps,
            heartbeat_gap_p95_s=mean_gap,
            challenges=tuple(challenges.get(node.id, [])),
            members_completed=members.get((node.id, MemberState.RELEASED.value), 0),
            members_lost=members.get((node.id, MemberState.LOST.value), 0),
        )
    return out


async def node_scores(
    session: AsyncSession,
    node_ids: Sequence[str],
    *,
    now: float,
    heartbeat_interval_s: float = 5.0,
) -> dict[str, float]:
    """Reliability in [0, 1] per node id (0.5 for a node with no history)."""
    inputs = await node_inputs(
        session, node_ids, now=now, heartbeat_interval_s=heartbeat_interval_s
    )
    return {node_id: score(i) for node_id, i in inputs.items()}


async def scores_now(session: AsyncSession, node_ids: Sequence[str]) -> dict[str, float]:
    """:func:`node_scores` at the current time (for placement)."""
    return await node_scores(session, node_ids, now=time.time())
