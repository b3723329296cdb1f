"""The reconciler's `provisioning` and `terminating` steps.

`provision` starts the head, then every worker in parallel, each acked only once its Ray
node is registered with the head. A member that fails is replaced once (same spec, another
node); if no replacement exists the cluster goes `terminating` with a ``fail_reason`` and
ends `failed` with it. A cluster deleted meanwhile (`terminating`) stops being provisioned
at the next member.

`teardown` stops every live member, frees its devices, closes the cluster's billing and
ends it `terminated` (or `failed` with its ``fail_reason``).

Both resume from the rows: a replica that takes a half-done cluster over (the previous
owner died) skips members already `ready` and asks again for the others.
"""

from __future__ import annotations

import asyncio
import json
import logging

from loom.coordinator.db.models import Cluster, Member
from loom.coordinator.loops import cluster_members as members
from loom.coordinator.loops.cluster_work import ClusterWork
from loom.coordinator.loops.isolation import isolated
from loom.coordinator.overlay import service as overlay_service
from loom.coordinator.services import billing
from loom.coordinator.services import clusters as cluster_service
from loom.core.models import ClusterState, MemberState

log = logging.getLogger(__name__)

_PROVISIONING = (ClusterState.PROVISIONING.value,)


async def provision(work: ClusterWork) -> None:
    t0 = work.now()
    async with work.apply("provision:read") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        if cluster is None or cluster.state != ClusterState.PROVISIONING.value:
            return
        rows = await cluster_service.members_of(session, work.cluster_id)
        timings = members.timings(cluster_service.timings_of(cluster))
    tried = {m.node_id for m in rows}
    head = next(
        (m for m in rows if m.role == "head" and m.state in cluster_service.LIVE_MEMBER), None
    )
    workers = [
        m.id
        for m in rows
        if m.role == "worker"
        and m.state in (MemberState.ASSIGNED.value, MemberState.STARTING.value)
    ]
    try:
        if head is None:
            raise members.MemberStartFailed("the cluster has no head member left")
        if head.state != MemberState.READY.value:
            _, info = await members.start_or_replace(
                work, head.id, tried, what="head", states=_PROVISIONING
            )
            timings["head_delivery_s"] = info.delivery_s
            timings["head_ray_start_s"] = info.start_s
            async with work.apply("provision:head-address") as session:
                cluster = await session.get(Cluster, work.cluster_id)
                assert cluster is not None
                cluster.head_address = info.gcs_address
                cluster.dashboard_url = info.dashboard_url
                cluster.client_address = info.client_address
            members.confirm_soon(work.state, work.cluster_id)
            timings["head_s"] = work.now() - t0
        t_workers = work.now()
        results = await asyncio.gather(
            *(
                members.start_or_replace(work, w, tried, what="worker", states=_PROVISIONING)
                for w in workers
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        timings["workers_s"] = work.now() - t_workers
        timings["total_s"] = work.now() - t0
        async with work.apply("provisioning->running") as session:
            cluster = await session.get(Cluster, work.cluster_id)
            assert cluster is not None
            if cluster.state == ClusterState.PROVISIONING.value:
                now = work.now()
                cluster.ready_at = now
                cluster.timings_json = json.dumps(timings)
                cluster_service.transition(
                    session, cluster, ClusterState.RUNNING, "all members ready", now
                )
    except members.NotProvisioning:
        return  # deleted (or failed) meanwhile: the next step takes it from there
    except members.MemberStartFailed as exc:
        await fail_cluster(work, str(exc), expect=_PROVISIONING)


async def fail_cluster(work: ClusterWork, reason: str, *, expect: tuple[str, ...]) -> None:
    """Send the cluster to `terminating`, to end `failed` with `reason`."""
    async with work.apply("->terminating(failed)") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        if cluster is None or cluster.state not in expect:
            return
        cluster.fail_reason = reason
        cluster_service.transition(session, cluster, ClusterState.TERMINATING, reason, work.now())


async def teardown(work: ClusterWork) -> None:
    """Stop every member, free devices; the cluster ends `terminated` (or `failed`)."""
    async with work.apply("teardown:read") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        if cluster is None or cluster.state != ClusterState.TERMINATING.value:
            return
        live = [
            (m.id, m.node_id)
            for m in await cluster_service.members_of(session, work.cluster_id)
            if m.state in cluster_service.LIVE_MEMBER
        ]

    async def stop_one(member_id: str, node_id: str) -> None:
        await members.stop_on_agent(work.state, node_id, member_id)
        async with work.apply(f"member.released:{member_id}") as session:
            fresh = await session.get(Member, member_id)
            assert fresh is not None
            await cluster_service.end_member(
                session, fresh, MemberState.RELEASED, "cluster down", work.now()
            )

    await asyncio.gather(*(stop_one(m, n) for m, n in live))
    async with work.apply("terminating->ended") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        assert cluster is not None
        if cluster.state != ClusterState.TERMINATING.value:
            return
        now = work.now()
        # A settlement that fails here (a poisoned row) must not keep the cluster alive:
        # it ends anyway, and the settlement loop retries its escrow, isolated per cluster.
        async with isolated("teardown", work.cluster_id), session.begin_nested():
            await billing.close_cluster(session, work.cluster_id, now, work.state.settings.fee_bps)
        if cluster.fail_reason:
            cluster_service.transition(
                session, cluster, ClusterState.FAILED, cluster.fail_reason, now
            )
        else:
            cluster_service.transition(
                session, cluster, ClusterState.TERMINATED, cluster.reason or "down", now
            )
    await overlay_service.release(work.state, work.cluster_id)  # revokes its certificates
