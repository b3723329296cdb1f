"""A claimed cluster's members: start one, fail one, place a replacement, stop one.

Used by the reconciler's steps (``cluster_provision``, ``cluster_heal``). Every write is a
guarded apply of the cluster's lease (``ClusterWork.apply``), and the member rows are the
durable progress: `starting` is written before the agent is asked, `ready` once it acked,
so a replica that takes the cluster over asks again only for members not yet `ready` (the
agent answers a repeated ``member.start`` for the same member with the same result).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Any

from loom.coordinator import confirmation
from loom.coordinator.agent_client import MEMBER_START_TIMEOUT_S, MEMBER_STOP_TIMEOUT_S
from loom.coordinator.db.models import Cluster, Member
from loom.coordinator.hub import AgentNotConnected, CommandFailed
from loom.coordinator.loops.cluster_work import ClusterWork
from loom.coordinator.overlay import service as overlay_service
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.services import confirmation as confirmation_service
from loom.coordinator.services.allocation import ReservationConflict
from loom.coordinator.state import CoordinatorState
from loom.core.models import MemberState
from loom.core.placement import PlacementFailure
from loom.protocol.commands import MemberStart

log = logging.getLogger(__name__)


class MemberStartFailed(RuntimeError):
    pass


class NotProvisioning(RuntimeError):
    """The cluster left the state this step works on (e.g. its owner deleted it)."""


@dataclass(frozen=True)
class Started:
    """What a started member's agent answered, with the coordinator's timings."""

    gcs_address: str
    dashboard_url: str
    client_address: str
    delivery_s: float
    start_s: float


def start_command(cluster: Cluster, member: Member, spec_env: dict[str, str]) -> MemberStart:
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


async def start_member(work: ClusterWork, member_id: str, *, states: tuple[str, ...]) -> Started:
    """Start one member (the cluster must be in one of `states`); `ready` when acked."""
    state = work.state
    async with work.apply(f"member.starting:{member_id}") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        member = await session.get(Member, member_id)
        assert cluster is not None and member is not None
        if cluster.state not in states:
            raise NotProvisioning(f"cluster is {cluster.state}")
        if member.state not in cluster_service.LIVE_MEMBER:
            raise MemberStartFailed(f"member {member_id} is {member.state}")
        command = start_command(cluster, member, dict(cluster_service.spec_of(cluster).env))
        member.state = MemberState.STARTING.value
        node_id, ends_at = member.node_id, cluster.expires_at
    sent_at = work.now()
    try:
        # With the overlay on: the agent generates the member's key, we sign its public key.
        command = await overlay_service.grant_args(
            state, command, work.cluster_id, member_id, ends_at, node_id
        )
        started = await state.agents.member_start(node_id, command, timeout=MEMBER_START_TIMEOUT_S)
    except (AgentNotConnected, CommandFailed) as exc:
        raise MemberStartFailed(str(exc)) from None
    now = work.now()
    received = started.received_at
    # Same clock only when agent and coordinator share a machine; clamp skew away.
    delivery = 0.0 if received is None else max(0.0, min(received - sent_at, now - sent_at))
    async with work.apply(f"member.ready:{member_id}") as session:
        member = await session.get(Member, member_id)
        assert member is not None
        was = member.state
        if was == MemberState.STARTING.value:
            member.state = MemberState.READY.value
            member.ready_at = now
            member.ray_node_id = started.ray_node_id[:64]
            member.confirm_note = confirmation_service.NOT_YET
        role = member.role
    if was != MemberState.STARTING.value:  # lost (or released) while its agent started it
        raise MemberStartFailed(f"member {member_id} was {was} when its agent answered")
    if role != "head":  # the head is asked once its addresses are stored (provision)
        confirm_soon(state, work.cluster_id)
    return Started(
        gcs_address=str(started.gcs_address or ""),
        dashboard_url=str(started.dashboard_url or ""),
        client_address=str(started.client_address or ""),
        delivery_s=delivery,
        start_s=now - sent_at,
    )


def confirm_soon(state: CoordinatorState, cluster_id: str) -> None:
    """Billing starts only once someone other than a member's agent confirms it: ask now."""
    state.track(asyncio.create_task(_confirm(state, cluster_id)))


async def _confirm(state: CoordinatorState, cluster_id: str) -> None:
    try:
        await confirmation.confirm_cluster(state, cluster_id)
    except Exception:
        log.exception("confirming the members of %s failed", cluster_id)


async def stop_on_agent(state: CoordinatorState, node_id: str, member_id: str) -> None:
    """Best effort: ask the member's agent to stop it (it also cleans up on reconnect)."""
    if not state.agents.reachable(node_id):
        return
    try:
        await state.agents.member_stop(node_id, member_id, timeout=MEMBER_STOP_TIMEOUT_S)
    except (AgentNotConnected, CommandFailed) as exc:
        log.warning("stop %s on %s: %s (the agent cleans up on reconnect)", member_id, node_id, exc)


async def fail_member(work: ClusterWork, member_id: str, reason: str) -> Member:
    """Mark a member lost (its devices freed) and stop whatever of it runs; returns it."""
    async with work.apply(f"member.lost:{member_id}") as session:
        member = await session.get(Member, member_id)
        assert member is not None
        await cluster_service.end_member(session, member, MemberState.LOST, reason, work.now())
    # Its overlay certificates are revoked first: its Nebula may outlive the stop.
    await overlay_service.revoke(work.state, work.cluster_id, [member_id])
    await stop_on_agent(work.state, member.node_id, member_id)
    return member


async def replace_member(work: ClusterWork, failed: Member, tried: set[str]) -> str | None:
    """Place and reserve a replacement for `failed`; returns the new member id or None."""
    state = work.state
    for attempt in range(5):  # a lost reservation race (stale index): place again
        try:
            async with work.apply(f"member.replace:{failed.id}:{attempt}") as session:
                cluster = await session.get(Cluster, work.cluster_id)
                assert cluster is not None
                plan = await cluster_service.placement_for(
                    session,
                    cluster_service.spec_of(cluster),
                    1,
                    connected=state.hub.present,
                    require_verified=state.settings.require_verified,
                    exclude_nodes=frozenset(tried),
                    index=state.placement,
                )
                if isinstance(plan, PlacementFailure):
                    return None
                member = await cluster_service.add_member(
                    session, cluster, dc_replace(plan.members[0], role=failed.role), work.now()
                )
                new_id, node_id = member.id, member.node_id
        except ReservationConflict as exc:
            if state.placement is not None:
                state.placement.invalidate_device(exc.device_id)
            continue
        if state.placement is not None:
            state.placement.reserved(plan)
        tried.add(node_id)
        return new_id
    return None


async def start_or_replace(
    work: ClusterWork, member_id: str, tried: set[str], *, what: str, states: tuple[str, ...]
) -> tuple[str, Started]:
    """Start a member; if it fails, replace it once (another node) and start that."""
    current: str | None = member_id
    last: Exception | None = None
    for _ in range(2):
        assert current is not None
        try:
            return current, await start_member(work, current, states=states)
        except MemberStartFailed as exc:
            last = exc
            failed = await fail_member(work, current, f"{what} failed to start: {exc}")
            current = await replace_member(work, failed, tried)
            if current is None:
                raise MemberStartFailed(
                    f"the {what} failed to start ({exc}) and no other node fits the spec"
                ) from None
    raise MemberStartFailed(f"the {what} failed to start twice ({last})")


def timings(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
