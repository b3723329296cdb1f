"""The reconciler's `healing` step: replace lost workers, then back to `running`.

A lost worker's billing stopped when it was marked lost (``healing.member_lost``); here a
replacement is placed under the same spec (never on a node the cluster already used) and
joins the same head. With no replacement available the cluster runs *degraded* and says so;
the `running` step sends it back here every ``DEGRADED_RETRY_S``.
"""

from __future__ import annotations

import logging

from loom.coordinator.db.models import Cluster
from loom.coordinator.loops import cluster_members as members
from loom.coordinator.loops.cluster_work import ClusterWork
from loom.coordinator.overlay import service as overlay_service
from loom.coordinator.services import clusters as cluster_service
from loom.core.models import ClusterState

log = logging.getLogger(__name__)

_HEALING = (ClusterState.HEALING.value,)


async def heal(work: ClusterWork) -> None:
    async with work.apply("heal:read") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        if cluster is None or cluster.state != ClusterState.HEALING.value:
            return
        rows = await cluster_service.members_of(session, work.cluster_id)
        nodes = cluster_service.spec_of(cluster).nodes
    live = [m for m in rows if m.state in cluster_service.LIVE_MEMBER]
    # The lost members' overlay certificates are revoked before anything else.
    await overlay_service.revoke_ended(work.state, work.cluster_id)
    # A replacement left `assigned`/`starting` by a replica that died: start it first.
    pending = [m.id for m in live if m.role == "worker" and m.state != "ready"]
    tried = {m.node_id for m in rows}
    template = next((m for m in rows if m.role == "worker"), None)
    try:
        for member_id in pending:
            try:
                await members.start_member(work, member_id, states=_HEALING)
            except members.MemberStartFailed as exc:
                await members.fail_member(work, member_id, f"replacement failed to start: {exc}")
        for _ in range(max(0, nodes - len(live))):
            if template is None:
                break
            new_id = await members.replace_member(work, template, tried)
            if new_id is None:
                break
            try:
                await members.start_member(work, new_id, states=_HEALING)
            except members.MemberStartFailed as exc:
                await members.fail_member(work, new_id, f"replacement failed to start: {exc}")
    except members.NotProvisioning:
        return  # deleted or failed meanwhile
    async with work.apply("healing->running") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        assert cluster is not None
        if cluster.state != ClusterState.HEALING.value:
            return
        ready = [
            m
            for m in await cluster_service.members_of(session, work.cluster_id)
            if m.state == "ready"
        ]
        short = nodes - len(ready)
        why = (
            "replaced the lost member(s)"
            if short <= 0
            else f"degraded: running with {len(ready)} of {nodes} nodes; no other node fits "
            "the spec right now (will retry)"
        )
        cluster_service.transition(session, cluster, ClusterState.RUNNING, why, work.now())
        cluster.reason = "" if short <= 0 else why
