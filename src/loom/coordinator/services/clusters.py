"""Clusters: create (validate, place, reserve), read, and move through their states.

Functions take the session explicitly and leave committing to the caller, except
`create_cluster`, which retries placement on a reservation conflict and so owns its
transactions.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Set as AbstractSet
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import Allocation, Cluster, ClusterEvent, Device, Member, Node
from loom.coordinator.errors import BadRequest, Conflict, NotFound
from loom.coordinator.metrics import timed_placement
from loom.coordinator.placement_index import PlacementIndex, loaded_now
from loom.coordinator.services import allocation, billing, confirmation
from loom.coordinator.services import nodes as node_service
from loom.core.catalog import CPU_MODEL
from loom.core.models import ClusterState, MemberState, NodeState
from loom.core.money import format_credits
from loom.core.placement import PlacementFailure, PlacementPlan, requirement_from_spec
from loom.core.spec import ClusterSpec, SpecError, parse_spec
from loom.protocol.api import ClusterEventOut, ClusterOut, MemberOut

ACTIVE = (
    ClusterState.REQUESTED.value,
    ClusterState.PROVISIONING.value,
    ClusterState.RUNNING.value,
    ClusterState.HEALING.value,
    ClusterState.TERMINATING.value,
)
LIVE_MEMBER = (MemberState.ASSIGNED.value, MemberState.STARTING.value, MemberState.READY.value)

_CLUSTER_NEXT: dict[ClusterState, set[ClusterState]] = {
    ClusterState.REQUESTED: {ClusterState.PROVISIONING, ClusterState.FAILED},
    ClusterState.PROVISIONING: {
        ClusterState.RUNNING,
        ClusterState.TERMINATING,
        ClusterState.FAILED,
    },
    ClusterState.RUNNING: {ClusterState.HEALING, ClusterState.TERMINATING, ClusterState.FAILED},
    ClusterState.HEALING: {ClusterState.RUNNING, ClusterState.TERMINATING, ClusterState.FAILED},
    ClusterState.TERMINATING: {ClusterState.TERMINATED, ClusterState.FAILED},
    ClusterState.TERMINATED: set(),
    ClusterState.FAILED: set(),
}


def parse_user_spec(data: dict[str, Any]) -> ClusterSpec:
    try:
        return parse_spec(data)
    except SpecError as exc:
        raise BadRequest("invalid_spec", str(exc)) from None


def transition(
    session: AsyncSession, cluster: Cluster, to: ClusterState, reason: str, now: float
) -> bool:
    current = ClusterState(cluster.state)
    if current == to:
        return False
    if to not in _CLUSTER_NEXT[current]:
        raise RuntimeError(f"cluster {cluster.id}: {current.value} → {to.value} is not allowed")
    session.add(
        ClusterEvent(
            cluster_id=cluster.id,
            at=now,
            from_state=current.value,
            to_state=to.value,
            reason=reason,
        )
    )
    cluster.state = to.value
    cluster.state_changed_at = now
    if to in (ClusterState.FAILED, ClusterState.TERMINATED) or reason:
        cluster.reason = reason
    if to in (ClusterState.FAILED, ClusterState.TERMINATED):
        cluster.ended_at = now
    return True


@timed_placement
async def placement_for(
    session: AsyncSession,
    spec: ClusterSpec,
    nodes: int,
    *,
    connected: AbstractSet[str],
    require_verified: bool,
    exclude_nodes: frozenset[str] = frozenset(),
    index: PlacementIndex | None = None,
) -> PlacementPlan | PlacementFailure:
    """Place from the coordinator's long-lived index when given one (the running
    coordinator always does), else from an index loaded from the database for this call."""
    req = requirement_from_spec(spec)
    if index is None or index.require_verified != require_verified:
        index = await loaded_now(session, require_verified=require_verified, presence=connected)
    return await index.place(req, nodes, connected=connected, exclude_nodes=exclude_nodes)


async def create_cluster(
    session: AsyncSession,
    owner: str,
    spec: ClusterSpec,
    now: float,
    *,
    connected: AbstractSet[str],
    require_verified: bool,
    index: PlacementIndex | None = None,
) -> Cluster:
    """Validate, place and reserve; the cluster comes back `provisioning`, committed.

    A reservation that loses a race (the index was stale, or a parallel request won)
    rolls back, re-reads that device's node into the index and places again."""
    name = spec.name or f"cluster-{secrets.token_hex(3)}"
    clash = await session.scalar(
        select(Cluster.id).where(
            Cluster.owner_key == owner, Cluster.name == name, Cluster.state.in_(ACTIVE)
        )
    )
    if clash:
        raise _name_taken(name)
    for _attempt in range(5):
        t_place = time.perf_counter()
        plan = await placement_for(
            session,
            spec,
            spec.nodes,
            connected=connected,
            require_verified=require_verified,
            index=index,
        )
        if isinstance(plan, PlacementFailure):
            raise Conflict("no_capacity", plan.reason)
        placed_s = time.perf_counter() - t_place
        try:
            cluster = await _reserve_plan(session, owner, name, spec, plan, now)
        except allocation.ReservationConflict as exc:
            await session.rollback()
            if index is not None:
                index.invalidate_device(exc.device_id)
            continue
        except IntegrityError as exc:
            await session.rollback()
            if _is_name_clash(exc):  # a parallel create of the same name won the race
                raise _name_taken(name) from None
            raise
        cluster.timings_json = json.dumps(
            {"placement_s": placed_s, "reserve_s": time.perf_counter() - t_place - placed_s}
        )
        try:
            await session.commit()
        except IntegrityError as exc:
            await session.rollback()
            if _is_name_clash(exc):
                raise _name_taken(name) from None
            raise
        if index is not None:
            index.reserved(plan)
        return cluster
    raise Conflict("busy", "capacity changed while placing five times in a row; try again")


#: The partial unique index of migration 0006: one live cluster per (owner, name).
NAME_INDEX = "uq_clusters_owner_live_name"


def _name_taken(name: str) -> Conflict:
    return Conflict(
        "cluster_exists",
        f"you already have an active cluster named {name!r}; pick another name or "
        f"`loom cluster down {name}` first",
        field="name",
    )


def _is_name_clash(exc: IntegrityError) -> bool:
    text = str(exc.orig)
    return NAME_INDEX in text or "clusters.owner_key, clusters.name" in text


async def _reserve_plan(
    session: AsyncSession, owner: str, name: str, spec: ClusterSpec, plan: PlacementPlan, now: float
) -> Cluster:
    cluster = Cluster(
        id=f"c-{secrets.token_hex(6)}",
        name=name,
        owner_key=owner,
        state=ClusterState.REQUESTED.value,
        reason="",
        spec_json=json.dumps(spec.model_dump(mode="json")),
        ray_token=secrets.token_urlsafe(32),
        head_address="",
        dashboard_url="",
        client_address="",
        hourly_micro=plan.hourly_micro,
        created_at=now,
        expires_at=now + spec.duration,
        state_changed_at=now,
        timings_json="{}",
    )
    session.add(cluster)
    session.add(
        ClusterEvent(
            cluster_id=cluster.id, at=now, from_state="", to_state="requested", reason="created"
        )
    )
    await session.flush()
    for member_plan in plan.members:
        await add_member(session, cluster, member_plan, now)
    await billing.hold_for_cluster(session, cluster, spec, now)
    transition(
        session,
        cluster,
        ClusterState.PROVISIONING,
        f"placed on {len(plan.members)} node(s) in {', '.join(plan.regions)}",
        now,
    )
    return cluster


async def add_member(
    session: AsyncSession, cluster: Cluster, member_plan: Any, now: float
) -> Member:
    member = Member(
        id=f"m-{secrets.token_hex(6)}",
        cluster_id=cluster.id,
        node_id=member_plan.node_id,
        role=member_plan.role,
        state=MemberState.ASSIGNED.value,
        reason="",
        model=member_plan.model,
        units=member_plan.units,
        gpu_indices="",
        price_micro=member_plan.price_micro,
        created_at=now,
        ray_node_id="",
    )
    session.add(member)
    await session.flush()
    units_each = member_plan.units if member_plan.model == CPU_MODEL else 1
    await allocation.reserve(session, member.id, member_plan.device_ids, units_each)
    if member_plan.model != CPU_MODEL:
        idx = (
            await session.execute(select(Device.idx).where(Device.id.in_(member_plan.device_ids)))
        ).scalars()
        member.gpu_indices = ",".join(str(i) for i in sorted(i for i in idx if i is not None))
    node = await node_service.get_node(session, member_plan.node_id)
    if node.state == NodeState.AVAILABLE.value:
        node_service.transition(session, node, NodeState.ALLOCATED, f"member of {cluster.id}", now)
    return member


async def end_member(
    session: AsyncSession, member: Member, to: MemberState, reason: str, now: float
) -> None:
    """Member → lost/released: free its devices; its node becomes available when idle."""
    if member.state not in LIVE_MEMBER:
        return
    member.state = to.value
    member.reason = reason
    member.ended_at = now
    for node_id in await allocation.release(session, member.id):
        node = await session.get(Node, node_id)
        if (
            node is not None
            and node.state == NodeState.ALLOCATED.value
            and not await allocation.node_has_allocations(session, node_id)
        ):
            node_service.transition(session, node, NodeState.AVAILABLE, "released", now)


async def get_cluster(session: AsyncSession, owner: str, ref: str) -> Cluster:
    """By id, or by name among the owner's clusters (the newest one)."""
    cluster = await session.get(Cluster, ref)
    if cluster is None:
        cluster = await session.scalar(
            select(Cluster)
            .where(Cluster.owner_key == owner, Cluster.name == ref)
            .order_by(Cluster.created_at.desc())
            .limit(1)
        )
    if cluster is None or cluster.owner_key != owner:
        raise NotFound("cluster_not_found", f"no cluster {ref!r} of yours; see `loom cluster list`")
    return cluster


async def members_of(session: AsyncSession, cluster_id: str) -> list[Member]:
    rows = await session.execute(
        select(Member).where(Member.cluster_id == cluster_id).order_by(Member.created_at, Member.id)
    )
    return list(rows.scalars())


async def list_clusters(session: AsyncSession, owner: str, *, all_states: bool) -> list[Cluster]:
    stmt = select(Cluster).where(Cluster.owner_key == owner).order_by(Cluster.created_at.desc())
    if not all_states:
        stmt = stmt.where(Cluster.state.in_(ACTIVE))
    return list((await session.execute(stmt)).scalars())


async def cluster_out(
    session: AsyncSession, cluster: Cluster, *, detail: bool = True
) -> ClusterOut:
    members = await members_of(session, cluster.id)
    now = time.time()
    names = {
        n.id: n.name
        for n in (
            await session.execute(select(Node).where(Node.id.in_([m.node_id for m in members])))
        ).scalars()
    }
    allocations = await _device_ids(session, [m.id for m in members])
    events = []
    if detail:
        rows = await session.execute(
            select(ClusterEvent)
            .where(ClusterEvent.cluster_id == cluster.id)
            .order_by(ClusterEvent.id)
        )
        events = [
            ClusterEventOut(at=e.at, from_state=e.from_state, to_state=e.to_state, reason=e.reason)
            for e in rows.scalars()
        ]
    return ClusterOut(
        id=cluster.id,
        name=cluster.name,
        owner=cluster.owner_key,
        state=cluster.state,
        reason=cluster.reason,
        head_address=cluster.head_address,
        dashboard_url=cluster.dashboard_url,
        client_address=cluster.client_address,
        ray_token=cluster.ray_token,
        price_per_hour=format_credits(cluster.hourly_micro),
        created_at=cluster.created_at,
        ready_at=cluster.ready_at,
        expires_at=cluster.expires_at,
        ended_at=cluster.ended_at,
        members=[
            MemberOut(
                id=m.id,
                node_id=m.node_id,
                node_name=names.get(m.node_id, ""),
                role=m.role,
                state=m.state,
                devices=allocations.get(m.id, []),
                model=m.model,
                units=m.units,
                price=format_credits(m.price_micro),
                reason=m.reason,
                ready_at=m.ready_at,
                ended_at=m.ended_at,
                confirmed=confirmation.status_of(m, now).confirmed,
                confirm_reason=confirmation.status_of(m, now).reason,
            )
            for m in members
        ],
        events=events,
        timings=_floats(cluster.timings_json),
        spec=node_service.load_json_lenient(cluster.spec_json),
    )


async def _device_ids(session: AsyncSession, member_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if not member_ids:
        return out
    rows = await session.execute(select(Allocation).where(Allocation.member_id.in_(member_ids)))
    for alloc in rows.scalars():
        out.setdefault(alloc.member_id, []).append(alloc.device_id)
    return out


def _floats(text: str) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in node_service.load_json_lenient(text).items()
        if isinstance(v, int | float)
    }


def timings_of(cluster: Cluster) -> dict[str, float]:
    return _floats(cluster.timings_json)


def spec_of(cluster: Cluster) -> ClusterSpec:
    """The stored spec (read leniently: it was valid when written)."""
    return parse_spec(node_service.load_json_lenient(cluster.spec_json))
