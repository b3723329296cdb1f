"""What the explorer shows: public, aggregate facts about the network, as JSON-ready dicts.

Nothing here is private: no cluster names, owners, specs, addresses or tokens; nodes are
public supply (their owner key is a public key, as in the ledger). Every function takes
the session explicitly and only reads, except `record_sample`, which appends one
utilization sample (the caller commits).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import (
    Cluster,
    ClusterEvent,
    Device,
    DeviceChallenge,
    Member,
    MemberMeter,
    Node,
    NodeEvent,
    UtilizationSample,
)
from loom.coordinator.errors import NotFound
from loom.coordinator.services.reliability import node_inputs
from loom.core.catalog import CPU_MODEL
from loom.core.challenge.capacity import offered_units
from loom.core.models import ClusterState, DeviceKind, DeviceState, NodeState
from loom.core.money import format_credits
from loom.core.reliability import score

Json = dict[str, Any]

#: Nodes whose devices count as supply (online and sellable).
ONLINE = (NodeState.AVAILABLE.value, NodeState.ALLOCATED.value)
LIVE_CLUSTER = (
    ClusterState.REQUESTED.value,
    ClusterState.PROVISIONING.value,
    ClusterState.RUNNING.value,
    ClusterState.HEALING.value,
    ClusterState.TERMINATING.value,
)
#: Nodes that are up (heart-beating), sellable or not yet.
CONNECTED = (NodeState.REGISTERING.value, NodeState.VERIFYING.value, *ONLINE)
SAMPLE_KEEP_S = 7 * 86_400.0


def short(key: str, n: int = 10) -> str:
    return key if len(key) <= n else f"{key[:n]}…"


def _units(dev: Device) -> int:
    return int(dev.count or 0) if dev.kind == DeviceKind.CPU.value else 1


# --------------------------------------------------------------------------- overview


async def utilization_now(session: AsyncSession) -> Json:
    rows = await session.execute(
        select(Device.kind, Device.count, Device.verified_units, Device.allocated_units, Node.state)
        .join(Node, Node.id == Device.node_id)
        .where(
            Device.present.is_(True),
            Node.state.in_(ONLINE),
            Device.state == DeviceState.VERIFIED.value,  # a claim is no public figure
        )
    )
    gpu_total = gpu_alloc = cpu_total = cpu_alloc = 0
    for kind, claimed, measured, allocated, _state in rows:
        count = offered_units(claimed, measured)  # measured, not claimed
        if kind == DeviceKind.CPU.value:
            cpu_total += int(count or 0)
            cpu_alloc += min(int(allocated or 0), int(count or 0))
        else:
            gpu_total += 1
            gpu_alloc += 1 if allocated else 0
    online = await session.scalar(
        select(func.count()).select_from(Node).where(Node.state.in_(CONNECTED))
    )
    return {
        "nodes_online": int(online or 0),
        "gpu_total": gpu_total,
        "gpu_allocated": gpu_alloc,
        "cpu_total": cpu_total,
        "cpu_allocated": cpu_alloc,
        "gpu_ratio": gpu_alloc / gpu_total if gpu_total else None,
        "cpu_ratio": cpu_alloc / cpu_total if cpu_total else None,
    }


async def supply(session: AsyncSession) -> Json:
    """Devices by model, region and state; verified versus claimed; nodes by state."""
    rows = await session.execute(
        select(Device.model, Device.kind, Device.state, Device.count, Node.region, Node.state)
        .join(Node, Node.id == Device.node_id)
        .where(Device.present.is_(True))
    )
    by_model: dict[str, Counter[str]] = defaultdict(Counter)
    by_region: dict[str, Counter[str]] = defaultdict(Counter)
    by_state: Counter[str] = Counter()
    gpus = Counter[str]()
    cpu_cores = Counter[str]()
    for model, kind, dev_state, count, region, node_state in rows:
        # an offline or banned node's devices are not for sale, whatever their verdict
        shown = dev_state if node_state in ONLINE else f"node {node_state}"
        by_model[model][dev_state] += 1
        by_region[region][dev_state] += 1
        by_state[shown] += 1
        if kind == DeviceKind.CPU.value:
            cpu_cores[dev_state] += int(count or 0)
        else:
            gpus[dev_state] += 1
    nodes = Counter[str]()
    for node_state, n in await session.execute(
        select(Node.state, func.count()).group_by(Node.state)
    ):
        nodes[node_state] = int(n)
    return {
        "nodes_by_state": dict(sorted(nodes.items())),
        "nodes_total": sum(nodes.values()),
        "devices_by_model": {m: dict(c) for m, c in sorted(by_model.items())},
        "devices_by_region": {r: dict(c) for r, c in sorted(by_region.items())},
        "devices_by_state": dict(sorted(by_state.items())),
        "devices_total": sum(by_state.values()),
        "verified": sum(c[DeviceState.VERIFIED.value] for c in by_model.values()),
        "claimed": sum(c[DeviceState.CLAIMED.value] for c in by_model.values()),
        "failed": sum(c[DeviceState.FAILED.value] for c in by_model.values()),
        "gpus": dict(gpus),
        "cpu_cores": dict(cpu_cores),
    }


async def price_index(session: AsyncSession) -> list[Json]:
    """Per model: the median, lowest and highest price of devices that are for sale now."""
    rows = await session.execute(
        select(Device.model, Device.kind, Device.count, Device.allocated_units, Node.price_micro)
        .join(Node, Node.id == Device.node_id)
        .where(
            Device.present.is_(True),
            Device.state != DeviceState.FAILED.value,
            Node.state.in_(ONLINE),
        )
    )
    prices: dict[str, list[int]] = defaultdict(list)
    free: Counter[str] = Counter()
    for model, kind, count, allocated, price in rows:
        prices[model].append(int(price))
        if kind == DeviceKind.CPU.value:
            free[model] += 1 if int(allocated or 0) < int(count or 0) else 0
        else:
            free[model] += 0 if allocated else 1
    out = []
    for model, values in sorted(prices.items(), key=lambda kv: (kv[0] == CPU_MODEL, kv[0])):
        out.append(
            {
                "model": model,
                "median": format_credits(int(statistics.median_low(values))),
                "low": format_credits(min(values)),
                "high": format_credits(max(values)),
                "devices": len(values),
                "free": free[model],
                "unit": "core-hour" if model == CPU_MODEL else "GPU-hour",
            }
        )
    return out


async def clusters_by_state(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(Cluster.state, func.count()).group_by(Cluster.state))
    return {s: int(n) for s, n in sorted(rows)}


async def overview(session: AsyncSession, *, heartbeats_per_s: float, now: float) -> Json:
    clusters = await clusters_by_state(session)
    return {
        "at": now,
        "supply": await supply(session),
        "utilization": await utilization_now(session),
        "prices": await price_index(session),
        "clusters_by_state": clusters,
        "clusters_running": clusters.get(ClusterState.RUNNING.value, 0),
        "clusters_live": sum(n for s, n in clusters.items() if s in LIVE_CLUSTER),
        "heartbeats_per_s": round(heartbeats_per_s, 2),
    }


# --------------------------------------------------------------------------- samples


async def record_sample(session: AsyncSession, *, heartbeats_per_s: float, now: float) -> Json:
    """Append the network's utilization now, and drop samples older than a week."""
    util = await utilization_now(session)
    session.add(
        UtilizationSample(
            at=now,
            nodes_online=util["nodes_online"],
            gpu_total=util["gpu_total"],
            gpu_allocated=util["gpu_allocated"],
            cpu_total=util["cpu_total"],
            cpu_allocated=util["cpu_allocated"],
            heartbeats_per_s=heartbeats_per_s,
        )
    )
    await session.execute(
        delete(UtilizationSample).where(UtilizationSample.at < now - SAMPLE_KEEP_S)
    )
    return util


async def utilization_history(session: AsyncSession, *, since: float) -> list[Json]:
    rows = (
        await session.execute(
            select(UtilizationSample)
            .where(UtilizationSample.at >= since)
            .order_by(UtilizationSample.at)
            .limit(2000)
        )
    ).scalars()
    return [
        {
            "at": r.at,
            "nodes_online": r.nodes_online,
            "gpu_total": r.gpu_total,
            "gpu_allocated": r.gpu_allocated,
            "cpu_total": r.cpu_total,
            "cpu_allocated": r.cpu_allocated,
            "heartbeats_per_s": r.heartbeats_per_s,
        }
        for r in rows
    ]


# --------------------------------------------------------------------------- nodes


def _device(dev: Device) -> Json:
    return {
        "id": dev.id,
        "kind": dev.kind,
        "model": dev.model,
        "name": dev.name,
        "index": dev.idx,
        "cores": dev.count if dev.kind == DeviceKind.CPU.value else None,
        "vram_gb": round(dev.vram_mb / 1024, 1) if dev.vram_mb is not None else None,
        "state": dev.state,
        "declared": dev.declared,
        "allocated_units": dev.allocated_units,
        # What the challenge measured: offers never exceed it (core.challenge.capacity).
        "cores_verified": dev.verified_units if dev.kind == DeviceKind.CPU.value else None,
        "units": _units(dev),
    }


def _node_row(node: Node, devices: Sequence[Device], reliability: float | None) -> Json:
    gpus = [d for d in devices if d.kind == DeviceKind.GPU.value]
    models = Counter(d.model for d in gpus)
    return {
        "id": node.id,
        "name": node.name,
        "owner": node.owner_key,
        "state": node.state,
        "region": node.region,
        "country": node.country,
        "price": format_credits(node.price_micro),
        "price_auto": node.price_auto,
        "gpus": len(gpus),
        "gpu_models": ", ".join(f"{n}× {m}" for m, n in sorted(models.items())) or "—",
        # verified cores only: a claim changes no public figure until the challenge passes
        "cpu_cores": sum(
            offered_units(d.count, d.verified_units)
            for d in devices
            if d.kind == DeviceKind.CPU.value and d.state == DeviceState.VERIFIED.value
        ),
        "cpu_cores_claimed": node.cpu_cores,
        "ram_gb": round(node.ram_mb / 1024, 1),
        "verified": sum(1 for d in devices if d.state == DeviceState.VERIFIED.value),
        "devices": len(devices),
        "reliability": None if reliability is None else round(reliability, 3),
        "last_heartbeat": node.last_heartbeat_at,
        "registered_at": node.registered_at,
        "state_changed_at": node.state_changed_at,
    }


async def _devices_of(session: AsyncSession, node_ids: Sequence[str]) -> dict[str, list[Device]]:
    out: dict[str, list[Device]] = defaultdict(list)
    for chunk in chunks(node_ids):  # bounded IN-lists (db.batching)
        rows = await session.execute(
            select(Device)
            .where(Device.node_id.in_(chunk), Device.present.is_(True))
            .order_by(Device.node_id, Device.kind.desc(), Device.idx)
        )
        for dev in rows.scalars():
            out[dev.node_id].append(dev)
    return out


async def nodes_list(
    session: AsyncSession, *, now: float, heartbeat_interval_s: float, limit: int = 5000
) -> list[Json]:
    nodes = list(
        (await session.execute(select(Node).order_by(Node.registered_at).limit(limit))).scalars()
    )
    ids = [n.id for n in nodes]
    devices = await _devices_of(session, ids)
    inputs = await node_inputs(session, ids, now=now, heartbeat_interval_s=heartbeat_interval_s)
    return [
        _node_row(n, devices.get(n.id, []), score(inputs[n.id]) if n.id in inputs else None)
        for n in nodes
    ]


async def _earnings_of(session: AsyncSession, node_id: str) -> Json:
    row = (
        await session.execute(
            select(
                func.coalesce(func.sum(MemberMeter.accrued_micro), 0),
                func.coalesce(func.sum(MemberMeter.settled_micro), 0),
                func.coalesce(func.sum(MemberMeter.paid_micro), 0),
            )
            .join(Member, Member.id == MemberMeter.member_id)
            .where(Member.node_id == node_id)
        )
    ).one()
    accrued, settled, paid = (int(x) for x in row)
    return {
        "accrued": format_credits(accrued),
        "settled": format_credits(settled),
        "paid": format_credits(paid),
        "fees": format_credits(settled - paid),
    }


async def node_detail(
    session: AsyncSession, node_id: str, *, now: float, heartbeat_interval_s: float
) -> Json:
    node = await session.get(Node, node_id)
    if node is None:
        raise NotFound("node_not_found", f"no node {node_id!r}")
    devices = (await _devices_of(session, [node_id])).get(node_id, [])
    inputs = (
        await node_inputs(session, [node_id], now=now, heartbeat_interval_s=heartbeat_interval_s)
    ).get(node_id)
    out = _node_row(node, devices, score(inputs) if inputs else None)
    out.update(
        cpu_model=node.cpu_model,
        disk_free_gb=round(node.disk_free_mb / 1024, 1),
        agent_version=node.agent_version,
        protocol=node.protocol,
        connected_since=node.connected_since,
        heartbeats=node.heartbeats,
        device_list=[_device(d) for d in devices],
    )
    if inputs is not None:
        out["reliability_inputs"] = {
            "uptime": round(inputs.online_s / inputs.observed_s, 4) if inputs.observed_s else None,
            "observed_s": round(inputs.observed_s, 1),
            "online_s": round(inputs.online_s, 1),
            "challenges_passed": sum(1 for c in inputs.challenges if c.passed),
            "challenges_failed": sum(1 for c in inputs.challenges if not c.passed),
            "members_completed": inputs.members_completed,
            "members_lost": inputs.members_lost,
        }
    challenges = (
        await session.execute(
            select(DeviceChallenge)
            .where(DeviceChallenge.node_id == node_id)
            .order_by(DeviceChallenge.id.desc())
            .limit(50)
        )
    ).scalars()
    out["challenges"] = [
        {
            "device_id": c.device_id,
            "device_class": c.device_class,
            "trigger": c.trigger,
            "ended_at": c.ended_at,
            "duration_s": round(c.duration_s, 3),
            "outcome": c.outcome,
            "reason": c.reason,
            "measured_rate": c.measured_rate,
            "required_rate": c.required_rate,
            "openings_checked": c.openings_checked,
            "openings_failed": c.openings_failed,
        }
        for c in challenges
    ]
    events = (
        await session.execute(
            select(NodeEvent)
            .where(NodeEvent.node_id == node_id)
            .order_by(NodeEvent.id.desc())
            .limit(100)
        )
    ).scalars()
    out["events"] = [
        {"at": e.at, "from": e.from_state, "to": e.to_state, "reason": e.reason} for e in events
    ]
    out["earnings"] = await _earnings_of(session, node_id)
    member_rows = await session.execute(
        select(Member.state, func.count()).where(Member.node_id == node_id).group_by(Member.state)
    )
    out["members_by_state"] = {s: int(n) for s, n in member_rows}
    return out


# --------------------------------------------------------------------------- clusters


def cost_so_far(cluster: Cluster, now: float) -> int:
    """Hourly price × hours since the cluster became ready (until it ended), micro-credits."""
    if cluster.ready_at is None:
        return 0
    end = cluster.ended_at if cluster.ended_at is not None else now
    return int(cluster.hourly_micro * max(0.0, end - cluster.ready_at) / 3600)


def _cluster_row(
    cluster: Cluster, members: Sequence[Member], regions: dict[str, str], now: float
) -> Json:
    live = [m for m in members if m.state in ("assigned", "starting", "ready")]
    models = Counter(m.model for m in live or members)
    return {
        "id": cluster.id,
        "state": cluster.state,
        "nodes": len({m.node_id for m in live}),
        "members_total": len(members),
        "members_ready": sum(1 for m in members if m.state == "ready"),
        "models": ", ".join(f"{m}" for m, _ in models.most_common()) or "—",
        "units": sum(m.units for m in live),
        "regions": ", ".join(sorted({regions.get(m.node_id, "?") for m in live or members})),
        "price_per_hour": format_credits(cluster.hourly_micro),
        "created_at": cluster.created_at,
        "ready_at": cluster.ready_at,
        "ended_at": cluster.ended_at,
        "cost_so_far": format_credits(cost_so_far(cluster, now)),
    }


async def _members_of(session: AsyncSession, ids: Sequence[str]) -> dict[str, list[Member]]:
    out: dict[str, list[Member]] = defaultdict(list)
    for chunk in chunks(ids):  # bounded IN-lists (db.batching)
        rows = await session.execute(
            select(Member).where(Member.cluster_id.in_(chunk)).order_by(Member.created_at)
        )
        for m in rows.scalars():
            out[m.cluster_id].append(m)
    return out


async def _regions(session: AsyncSession, members: Sequence[Member]) -> dict[str, str]:
    out: dict[str, str] = {}
    for chunk in chunks(sorted({m.node_id for m in members})):  # bounded IN-lists
        rows = await session.execute(select(Node.id, Node.region).where(Node.id.in_(chunk)))
        out.update({i: r for i, r in rows})
    return out


async def clusters_list(session: AsyncSession, *, now: float, limit: int = 500) -> list[Json]:
    clusters = list(
        (
            await session.execute(select(Cluster).order_by(Cluster.created_at.desc()).limit(limit))
        ).scalars()
    )
    members = await _members_of(session, [c.id for c in clusters])
    regions = await _regions(session, [m for ms in members.values() for m in ms])
    return [_cluster_row(c, members.get(c.id, []), regions, now) for c in clusters]


async def cluster_detail(session: AsyncSession, cluster_id: str, *, now: float) -> Json:
    cluster = await session.get(Cluster, cluster_id)
    if cluster is None:
        raise NotFound("cluster_not_found", f"no cluster {cluster_id!r}")
    members = (await _members_of(session, [cluster_id])).get(cluster_id, [])
    regions = await _regions(session, members)
    out = _cluster_row(cluster, members, regions, now)
    settled = await session.scalar(
        select(func.coalesce(func.sum(MemberMeter.settled_micro), 0)).where(
            MemberMeter.cluster_id == cluster_id
        )
    )
    out["settled"] = format_credits(int(settled or 0))
    out["expires_at"] = cluster.expires_at
    out["members"] = [
        {
            "role": m.role,
            "state": m.state,
            "model": m.model,
            "units": m.units,
            "node_id": m.node_id,
            "region": regions.get(m.node_id, ""),
            "price": format_credits(m.price_micro),
            "ready_at": m.ready_at,
            "ended_at": m.ended_at,
        }
        for m in members
    ]
    events = (
        await session.execute(
            select(ClusterEvent)
            .where(ClusterEvent.cluster_id == cluster_id)
            .order_by(ClusterEvent.id)
        )
    ).scalars()
    out["events"] = [{"at": e.at, "from": e.from_state, "to": e.to_state} for e in events]
    return out
