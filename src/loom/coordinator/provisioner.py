"""Provisioning and teardown: drive a cluster's members through the agents.

`provision` starts the head, then every worker in parallel, each through a typed command
whose ack arrives only when that member's Ray node is registered with the head. A member
that fails is replaced once (same spec, another node); if no replacement exists the
cluster fails with the reason. `teardown` stops every member and frees its devices.

Both are idempotent: the reconciler re-runs them after a coordinator restart, and agents
treat repeated commands for the same member as no-ops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace as dc_replace
from typing import Any

from loom.coordinator import confirmation
from loom.coordinator.db.models import Cluster, Member
from loom.coordinator.hub import AgentNotConnected, CommandFailed
from loom.coordinator.loops.isolation import isolated
from loom.coordinator.overlay import service as overlay_service
from loom.coordinator.services import billing
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.services import confirmation as confirmation_service
from loom.coordinator.services.allocation import ReservationConflict
from loom.coordinator.state import CoordinatorState
from loom.core.models import ClusterState, MemberState
from loom.core.placement import PlacementFailure
from loom.protocol.commands import MemberStart

log = logging.getLogger(__name__)

#: How long one member may take to start and join (ray start + registration).
MEMBER_START_TIMEOUT_S = 90.0
MEMBER_STOP_TIMEOUT_S = 30.0


class MemberStartFailed(RuntimeError):
    pass


def start_args(cluster: Cluster, member: Member, spec_env: dict[str, str]) -> MemberStart:
    gpu = [int(i) for i in member.gpu_indices.split(",") if i]
    return MemberStart(
        cluster_id=cluster.id,
        member_id=member.id,
        role="head" if member.role == "head" else "worker",
        token=cluster.ray_token,
        head_address=cluster.head_address or None,
        num_cpus=member.units if member.model == "cpu" else 1,
        gpu_indices=gpu,
        env=spec_env,
    )


async def start_member(state: CoordinatorState, cluster_id: str, member_id: str) -> dict[str, Any]:
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id)
        member = await session.get(Member, member_id)
        assert cluster is not None and member is not None
        spec = cluster_service.spec_of(cluster)
        args = start_args(cluster, member, dict(spec.env))
        member.state = MemberState.STARTING.value
        node_id = member.node_id
        ends_at = cluster.expires_at
        await session.commit()
    args = await overlay_service.grant_args(state, args, cluster_id, member_id, ends_at)
    sent_at = time.time()
    try:
        started = await state.agents.member_start(node_id, args, timeout=MEMBER_START_TIMEOUT_S)
    except (AgentNotConnected, CommandFailed) as exc:
        raise MemberStartFailed(str(exc)) from None
    now = time.time()
    result: dict[str, Any] = started.model_dump()
    received = started.received_at
    if received is not None:
        # Same clock only when agent and coordinator share a machine; clamp skew away.
        result["delivery_s"] = max(0.0, min(received - sent_at, now - sent_at))
    result["start_s"] = now - sent_at
    ray_node_id = started.ray_node_id[:64]
    async with state.session() as session:
        member = await session.get(Member, member_id)
        assert member is not None
        if member.state == MemberState.STARTING.value:
            member.state = MemberState.READY.value
            member.ready_at = now
            member.ray_node_id = ray_node_id
            member.confirm_note = confirmation_service.NOT_YET
        role = member.role
        await session.commit()
    if role != "head":  # the head is asked once its addresses are stored (provision)
        confirm_soon(state, cluster_id)
    return result


def confirm_soon(state: CoordinatorState, cluster_id: str) -> None:
    """Billing starts only once someone other than a member's agent confirms it: ask now."""
    state.track(asyncio.create_task(_confirm(state, cluster_id)))


async def _confirm(state: CoordinatorState, cluster_id: str) -> None:
    try:
        await confirmation.confirm_cluster(state, cluster_id)
    except Exception:
        log.exception("confirming the members of %s failed", cluster_id)


async def fail_member(state: CoordinatorState, member_id: str, reason: str) -> str:
    async with state.session() as session:
        member = await session.get(Member, member_id)
        assert member is not None
        node_id = member.node_id
        await cluster_service.end_member(session, member, MemberState.LOST, reason, time.time())
        await session.commit()
    # Best effort: make sure nothing of it lingers on the node.
    if state.agents.reachable(node_id):
        try:
            await state.agents.member_stop(node_id, member_id, timeout=MEMBER_STOP_TIMEOUT_S)
        except (AgentNotConnected, CommandFailed) as exc:
            log.warning("could not stop failed member %s: %s", member_id, exc)
    return node_id


async def replace_member(
    state: CoordinatorState, cluster_id: str, failed: Member, tried: set[str]
) -> str | None:
    """Place and reserve a replacement for `failed`; returns the new member id or None."""
    async with state.session() as session:
        for _attempt in range(5):  # a lost reservation race (stale index): place again
            cluster = await session.get(Cluster, cluster_id)
            assert cluster is not None
            spec = cluster_service.spec_of(cluster)
            plan = await cluster_service.placement_for(
                session,
                spec,
                1,
                connected=state.hub.connections.keys(),
                require_verified=state.settings.require_verified,
                exclude_nodes=frozenset(tried),
                index=state.placement,
            )
            if isinstance(plan, PlacementFailure):
                return None
            replacement = plan.members[0]
            try:
                member = await cluster_service.add_member(
                    session, cluster, dc_replace(replacement, role=failed.role), time.time()
                )
            except ReservationConflict as exc:
                await session.rollback()
                if state.placement is not None:
                    state.placement.invalidate_device(exc.device_id)
                continue
            await session.commit()
            if state.placement is not None:
                state.placement.reserved(plan)
            return member.id
        return None


async def provision(state: CoordinatorState, cluster_id: str) -> None:
    t0 = time.time()
    timings: dict[str, float] = {}
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id)
        if cluster is None or cluster.state != ClusterState.PROVISIONING.value:
            return
        members = await cluster_service.members_of(session, cluster_id)
        timings.update(cluster_service.timings_of(cluster))
    tried = {m.node_id for m in members}
    head = next((m for m in members if m.role == "head" and m.state != "lost"), None)
    workers = [m for m in members if m.role == "worker" and m.state in ("assigned", "starting")]
    try:
        if head is not None and head.state != MemberState.READY.value:
            head_id: str | None = head.id
            for _ in range(2):
                assert head_id is not None
                try:
                    info = await start_member(state, cluster_id, head_id)
                    break
                except MemberStartFailed as exc:
                    failed = await get_member(state, head_id)
                    await fail_member(state, head_id, f"head failed to start: {exc}")
                    head_id = await replace_member(state, cluster_id, failed, tried)
                    if head_id is None:
                        raise MemberStartFailed(
                            f"the head failed to start ({exc}) and no other node fits"
                        ) from None
                    tried.add((await get_member(state, head_id)).node_id)
            else:
                raise MemberStartFailed("the head failed to start twice")
            timings["head_delivery_s"] = float(info.get("delivery_s", 0.0))
            timings["head_ray_start_s"] = float(info.get("start_s", 0.0))
            async with state.session() as session:
                cluster = await session.get(Cluster, cluster_id)
                assert cluster is not None
                cluster.head_address = str(info.get("gcs_address", ""))
                cluster.dashboard_url = str(info.get("dashboard_url") or "")
                cluster.client_address = str(info.get("client_address") or "")
                await session.commit()
            confirm_soon(state, cluster_id)
            timings["head_s"] = time.time() - t0
        t_workers = time.time()
        results = await asyncio.gather(
            *(_start_worker(state, cluster_id, w, tried) for w in workers), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise MemberStartFailed(str(errors[0]))
        timings["workers_s"] = time.time() - t_workers
        timings["total_s"] = time.time() - t0
        async with state.session() as session:
            cluster = await session.get(Cluster, cluster_id)
            assert cluster is not None
            if cluster.state == ClusterState.PROVISIONING.value:
                now = time.time()
                cluster.ready_at = now
                cluster.timings_json = json.dumps(timings)
                cluster_service.transition(
                    session, cluster, ClusterState.RUNNING, "all members ready", now
                )
            await session.commit()
    except MemberStartFailed as exc:
        await teardown(state, cluster_id, failed_reason=str(exc))


async def get_member(state: CoordinatorState, member_id: str) -> Member:
    async with state.session() as session:
        member = await session.get(Member, member_id)
        assert member is not None
        return member


async def _start_worker(
    state: CoordinatorState, cluster_id: str, worker: Member, tried: set[str]
) -> None:
    member_id: str | None = worker.id
    for _ in range(2):
        assert member_id is not None
        try:
            await start_member(state, cluster_id, member_id)
            return
        except MemberStartFailed as exc:
            failed = await get_member(state, member_id)
            await fail_member(state, member_id, f"failed to start: {exc}")
            member_id = await replace_member(state, cluster_id, failed, tried)
            if member_id is None:
                raise MemberStartFailed(
                    f"a worker failed to start ({exc}) and no other node fits the spec"
                ) from None
            tried.add((await get_member(state, member_id)).node_id)
    raise MemberStartFailed("a worker failed to start twice")


async def teardown(
    state: CoordinatorState, cluster_id: str, *, failed_reason: str | None = None, reason: str = ""
) -> None:
    """Stop every member, free devices; the cluster ends `terminated` (or `failed`)."""
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id)
        if cluster is None or cluster.state in ("terminated", "failed"):
            return
        now = time.time()
        if cluster.state != ClusterState.TERMINATING.value:
            why = failed_reason or reason or "requested"
            cluster_service.transition(session, cluster, ClusterState.TERMINATING, why, now)
        members = [
            m
            for m in await cluster_service.members_of(session, cluster_id)
            if m.state in cluster_service.LIVE_MEMBER
        ]
        await session.commit()

    async def stop_one(member: Member) -> None:
        if state.agents.reachable(member.node_id):
            try:
                await state.agents.member_stop(
                    member.node_id, member.id, timeout=MEMBER_STOP_TIMEOUT_S
                )
            except (AgentNotConnected, CommandFailed) as exc:
                log.warning(
                    "stop %s on %s: %s (the agent cleans up on reconnect)",
                    member.id,
                    member.node_id,
                    exc,
                )
        async with state.session() as session:
            fresh = await session.get(Member, member.id)
            assert fresh is not None
            await cluster_service.end_member(
                session, fresh, MemberState.RELEASED, "cluster down", time.time()
            )
            await session.commit()

    await asyncio.gather(*(stop_one(m) for m in members))
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id)
        assert cluster is not None
        now = time.time()
        # A settlement that fails here (a poisoned row) must not keep the cluster alive:
        # it ends anyway, and the settlement loop retries its escrow, isolated per cluster.
        async with isolated("teardown", cluster_id), session.begin_nested():
            await billing.close_cluster(session, cluster_id, now, state.settings.fee_bps)
        if failed_reason:
            cluster_service.transition(session, cluster, ClusterState.FAILED, failed_reason, now)
        else:
            cluster_service.transition(
                session, cluster, ClusterState.TERMINATED, reason or "down", now
            )
        await session.commit()
    overlay_service.release(state, cluster_id)
