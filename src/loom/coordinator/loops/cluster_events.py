"""Cluster events from agents and the watchdog: write the facts, wake the reconciler.

- A lost **worker** (agent offline, Ray node dead): it is marked `lost` at once (its
  billing stops at detection, its devices are freed) and a running cluster goes `healing`;
  the reconciler's healing step (``loops/cluster_heal.py``) places a replacement under the
  same spec (never on a node the cluster already uses) that joins the same head. With no
  replacement available the cluster keeps running *degraded* and says so.
- A lost **head** fails the cluster: Ray's head holds the GCS, so its workers and any
  running jobs are gone with it. The cluster goes `terminating` with a ``fail_reason`` naming
  the node, and the reconciler's teardown ends it `failed`; the user creates a new cluster
  and resubmits (documented in the README).
- A (re)connecting agent is told which members it should still be running.

Nothing here drives work: these handlers only write rows (under the cluster row's lock,
which every reconciler apply takes first) and set ``state.clusters_wake``.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from loom.coordinator import ray_peers
from loom.coordinator.db.models import Cluster, Member, Node
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import ClusterState, MemberState, NodeState
from loom.protocol.messages import Report

log = logging.getLogger(__name__)


async def member_lost(
    state: CoordinatorState, member_id: str, reason: str, now: float | None = None
) -> None:
    now = time.time() if now is None else now
    async with state.session() as session:
        member = await session.get(Member, member_id)
        if member is None or member.state not in cluster_service.LIVE_MEMBER:
            return
        cluster = await session.get(
            Cluster, member.cluster_id, with_for_update=True, populate_existing=True
        )
        assert cluster is not None
        await session.refresh(member)  # read again under the cluster's lock
        if member.state not in cluster_service.LIVE_MEMBER:
            return
        await cluster_service.end_member(session, member, MemberState.LOST, reason, now)
        if cluster.state in (ClusterState.RUNNING.value, ClusterState.HEALING.value):
            if member.role == "head":
                why = (
                    f"head node {member.node_id} lost ({reason}); the Ray head holds the "
                    "cluster's state, so create a new cluster and resubmit jobs"
                )
                cluster.fail_reason = why
                cluster_service.transition(session, cluster, ClusterState.TERMINATING, why, now)
            else:
                cluster_service.transition(
                    session,
                    cluster,
                    ClusterState.HEALING,
                    f"worker on {member.node_id} lost: {reason}",
                    now,
                )
        # Provisioning handles its own failures (the start fails); ending clusters need
        # nothing more.
        cluster_id = cluster.id
        await session.commit()
    log.info("cluster %s lost member %s: %s", cluster_id, member_id, reason)
    ray_peers.tell_head(state, member_id, reason)  # the head's GCS forgets it at once
    state.clusters_wake.set()


async def on_report_member_lost(state: CoordinatorState, node_id: str, report: Report) -> None:
    member_id = str(report.data.get("member_id", ""))
    reason = str(report.data.get("reason", "Ray node died"))[:300]
    async with state.session() as session:
        member = await session.get(Member, member_id)
        if member is None or member.node_id != node_id:
            return  # an agent may only speak for its own members
    await member_lost(state, member_id, f"Ray node died on {node_id}: {reason}")


async def on_node_offline(state: CoordinatorState, node_id: str) -> None:
    async with state.session() as session:
        node = await session.get(Node, node_id)
        drained = node is not None and node.state == NodeState.DRAINED.value
        rows = await session.execute(
            select(Member.id).where(
                Member.node_id == node_id, Member.state.in_(cluster_service.LIVE_MEMBER)
            )
        )
        member_ids = list(rows.scalars())
    why = "was drained (its supplier stopped the agent)" if drained else "went offline"
    for member_id in member_ids:
        await member_lost(state, member_id, f"node {node_id} {why}")
