"""Keeping clusters alive: react to lost members, expire clusters, resume after restarts.

- A lost **worker** (agent offline, Ray node dead): its billing stops at detection, the
  cluster goes `healing`, a replacement is placed under the same spec (never on a node
  the cluster already uses) and joins the same head; the cluster returns to `running`.
  With no replacement available the cluster keeps running *degraded* and says so.
- A lost **head** fails the cluster: Ray's head holds the GCS, so its workers and any
  running jobs are gone with it. The reason names the node; the user creates a new
  cluster and resubmits (documented in the README).
- The reconciler (every few seconds, idempotent) expires clusters past `duration`,
  resumes provisioning and teardown that a restarted coordinator left half-done
  (taking a lease on the row so only one replica drives it), and tells reconnecting
  agents which members they should still be running.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from sqlalchemy import Table, select

from loom.coordinator import leases, provisioner
from loom.coordinator.db.models import Cluster, Member, Node
from loom.coordinator.hub import AgentNotConnected, CommandFailed
from loom.coordinator.loops.isolation import isolated
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import ClusterState, MemberState, NodeState
from loom.protocol.messages import Report

log = logging.getLogger(__name__)

LEASE_S = 120.0


async def member_lost(state: CoordinatorState, member_id: str, reason: str) -> None:
    now = time.time()
    async with state.session() as session:
        member = await session.get(Member, member_id)
        if member is None or member.state not in cluster_service.LIVE_MEMBER:
            return
        cluster = await session.get(Cluster, member.cluster_id)
        assert cluster is not None
        was_ready = member.state == MemberState.READY.value
        await cluster_service.end_member(session, member, MemberState.LOST, reason, now)
        cluster_id, role = cluster.id, member.role
        if cluster.state not in (ClusterState.RUNNING.value, ClusterState.HEALING.value):
            # Provisioning handles its own failures; ending clusters need nothing more.
            await session.commit()
            return
        if role == "head":
            await session.commit()
            await provisioner.teardown(
                state,
                cluster_id,
                failed_reason=f"head node {member.node_id} lost ({reason}); the Ray head holds "
                "the cluster's state, so create a new cluster and resubmit jobs",
            )
            return
        cluster_service.transition(
            session,
            cluster,
            ClusterState.HEALING,
            f"worker on {member.node_id} lost: {reason}",
            now,
        )
        await session.commit()
    log.info("cluster %s healing after losing %s (ready=%s)", cluster_id, member_id, was_ready)
    await heal(state, cluster_id)


async def heal(state: CoordinatorState, cluster_id: str) -> None:
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id)
        if cluster is None or cluster.state != ClusterState.HEALING.value:
            return
        members = await cluster_service.members_of(session, cluster_id)
        spec = cluster_service.spec_of(cluster)
    live = [m for m in members if m.state in cluster_service.LIVE_MEMBER]
    missing = spec.nodes - len(live)
    tried = {m.node_id for m in members}
    added = 0
    for _ in range(missing):
        template = next(m for m in members if m.role == "worker")
        new_id = await provisioner.replace_member(state, cluster_id, template, tried)
        if new_id is None:
            break
        new_member = await provisioner.get_member(state, new_id)
        tried.add(new_member.node_id)
        try:
            await provisioner.start_member(state, cluster_id, new_id)
            added += 1
        except provisioner.MemberStartFailed as exc:
            await provisioner.fail_member(state, new_id, f"replacement failed to start: {exc}")
    now = time.time()
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id)
        assert cluster is not None
        if cluster.state != ClusterState.HEALING.value:
            return
        short = missing - added
        why = (
            f"replaced {added} lost member(s)"
            if short == 0
            else f"degraded: running with {spec.nodes - short} of {spec.nodes} nodes; no other "
            "node fits the spec right now (will retry)"
        )
        cluster_service.transition(session, cluster, ClusterState.RUNNING, why, now)
        cluster.reason = "" if short == 0 else why
        await session.commit()


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


async def on_node_connected(state: CoordinatorState, node_id: str) -> None:
    """Tell a (re)connecting agent which members it should be running; it stops the rest."""
    async with state.session() as session:
        rows = await session.execute(
            select(Member.id).where(
                Member.node_id == node_id, Member.state.in_(cluster_service.LIVE_MEMBER)
            )
        )
        wanted = list(rows.scalars())
    if not state.agents.reachable(node_id):
        return
    try:
        await state.agents.member_sync(node_id, wanted)
    except (AgentNotConnected, CommandFailed) as exc:
        log.warning("member.sync with %s failed: %s", node_id, exc)


async def _take_lease(state: CoordinatorState, cluster_id: str, now: float) -> bool:
    table = cast(Table, Cluster.__table__)
    async with state.session() as session:
        lease = await leases.claim_one(
            session, table, cluster_id, owner=state.settings.replica_id, now=now, ttl_s=LEASE_S
        )
        await session.commit()
        return lease is not None


async def reconcile_step(state: CoordinatorState, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    acted: dict[str, list[str]] = {"expired": [], "resumed": [], "healing": []}
    async with state.session() as session:
        rows = await session.execute(
            select(Cluster.id, Cluster.state, Cluster.expires_at, Cluster.lock_expires_at).where(
                Cluster.state.in_(cluster_service.ACTIVE)
            )
        )
        clusters = [(str(r[0]), str(r[1]), float(r[2]), float(r[3] or 0.0)) for r in rows]
    for cluster_id, cstate, expires_at, lease_until in clusters:
        if cluster_id in state.driving:
            continue
        async with isolated("reconciler", cluster_id):  # one bad row never stops the rest
            await _reconcile_one(state, cluster_id, cstate, expires_at, lease_until, now, acted)
    return acted


async def _reconcile_one(
    state: CoordinatorState,
    cluster_id: str,
    cstate: str,
    expires_at: float,
    lease_until: float,
    now: float,
    acted: dict[str, list[str]],
) -> None:
    if cstate in ("running", "healing") and expires_at <= now:
        if await _take_lease(state, cluster_id, now):
            acted["expired"].append(cluster_id)
            state.drive(
                cluster_id, provisioner.teardown(state, cluster_id, reason="duration expired")
            )
    elif cstate == "provisioning" and lease_until < now and now - lease_until > 0:
        if await _take_lease(state, cluster_id, now):
            acted["resumed"].append(cluster_id)
            state.drive(cluster_id, provisioner.provision(state, cluster_id))
    elif cstate == "terminating" and lease_until < now:
        if await _take_lease(state, cluster_id, now):
            acted["resumed"].append(cluster_id)
            state.drive(cluster_id, provisioner.teardown(state, cluster_id))
    elif cstate == "running":
        await _retry_degraded(state, cluster_id, now, acted)


async def _retry_degraded(
    state: CoordinatorState, cluster_id: str, now: float, acted: dict[str, list[str]]
) -> None:
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id)
        if cluster is None or not cluster.reason.startswith("degraded"):
            return
        if now - cluster.state_changed_at < 10:
            return
        cluster_service.transition(session, cluster, ClusterState.HEALING, "retrying degraded", now)
        await session.commit()
    acted["healing"].append(cluster_id)
    state.drive(cluster_id, heal(state, cluster_id))
