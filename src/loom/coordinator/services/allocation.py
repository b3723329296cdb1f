"""Device allocation: build the placement index from the database, reserve atomically.

Reservation is a conditional UPDATE per device (`allocated_units + u <= capacity`), so two
coordinators — or two requests in one — can never hand out the same unit: the loser sees
rowcount 0, rolls back, and places again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Set as AbstractSet
from typing import cast

from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.bus import publish_on
from loom.coordinator.db.models import Allocation, Device, Node
from loom.core.catalog import CPU_MODEL
from loom.core.challenge.capacity import offered_units
from loom.core.models import ConnectivityTier, DeviceState, NodeState, SecurityTier
from loom.core.placement import DeviceIndex, FreeDevice, NodeCapacity, Requirement
from loom.protocol.events import ChangeCause

PLACEABLE = (NodeState.AVAILABLE.value, NodeState.ALLOCATED.value)


class ReservationConflict(RuntimeError):
    """Someone else took a unit between placement and reservation; place again."""

    def __init__(self, message: str, device_id: str = "") -> None:
        super().__init__(message)
        self.device_id = device_id


async def build_index(
    session: AsyncSession,
    req: Requirement,
    *,
    require_verified: bool,
    connected: AbstractSet[str] | None = None,
    reliability: dict[str, float] | None = None,
) -> DeviceIndex:
    """An index of free capacity for the models `req` accepts (one query, indexed)."""
    models = {m for m, _ in req.options}
    stmt = (
        select(Device, Node)
        .join(Node, Node.id == Device.node_id)
        .where(
            Node.state.in_(PLACEABLE),
            Device.model.in_(models),
            Device.present.is_(True),
            Device.state != DeviceState.FAILED.value,
        )
    )
    if req.regions:
        stmt = stmt.where(Node.region.in_(sorted(req.regions)))
    if require_verified:
        stmt = stmt.where(Device.state == DeviceState.VERIFIED.value)
    grouped: dict[tuple[str, str], list[tuple[Device, Node]]] = defaultdict(list)
    for dev, node in (await session.execute(stmt)).all():
        if connected is not None and node.id not in connected:
            continue
        grouped[(node.id, dev.model)].append((dev, node))
    index = DeviceIndex()
    for (node_id, model), rows in grouped.items():
        node = rows[0][1]
        free: list[FreeDevice] = []
        cpus = 0
        for dev, _ in rows:
            capacity = offered_units(dev.count, dev.verified_units)  # measured, not claimed
            if dev.allocated_units >= capacity:
                continue
            # Until verification gates placement, claimed devices are offered as verified.
            free.append(FreeDevice(dev.id, DeviceState.VERIFIED))
            if model == CPU_MODEL:
                cpus = capacity - dev.allocated_units
        if not free:
            continue
        vram = max((d.vram_mb or 0) for d, _ in rows) / 1024
        index.upsert(
            NodeCapacity(
                node_id=node_id,
                model=model,
                region=node.region,
                devices=tuple(free),
                price_micro=node.price_micro,
                reliability=(reliability or {}).get(node_id, 0.5),
                vram_gb=vram,
                ram_gb=node.ram_mb / 1024,
                cpus=cpus,
                security=SecurityTier.COMMUNITY,
                connectivity=ConnectivityTier.ULTRA,
                state=NodeState(node.state),
                country=node.country,
                node_name=node.name,
            )
        )
    return index


async def reserve(
    session: AsyncSession, member_id: str, device_ids: tuple[str, ...], units_each: int
) -> None:
    """Take `units_each` units of every device for `member_id`, or raise ReservationConflict."""
    table = cast(Table, Device.__table__)
    for device_id in device_ids:
        row = (
            await session.execute(
                select(Device.count, Device.verified_units, Device.node_id).where(
                    Device.id == device_id
                )
            )
        ).first()
        cap = offered_units(row[0], row[1]) if row is not None else 1
        if row is not None:
            publish_on(session, row[2], ChangeCause.ALLOCATION)
        result = await session.execute(
            update(table)
            .where(table.c.id == device_id, table.c.allocated_units + units_each <= cap)
            .values(allocated_units=table.c.allocated_units + units_each)
        )
        if getattr(result, "rowcount", 0) != 1:
            raise ReservationConflict(f"device {device_id} was taken concurrently", device_id)
        session.add(Allocation(member_id=member_id, device_id=device_id, units=units_each))


async def release(session: AsyncSession, member_id: str) -> list[str]:
    """Give back every unit `member_id` holds; returns the node ids touched."""
    table = cast(Table, Device.__table__)
    allocations = list(
        (
            await session.execute(select(Allocation).where(Allocation.member_id == member_id))
        ).scalars()
    )
    nodes: set[str] = set()
    for alloc in allocations:
        await session.execute(
            update(table)
            .where(table.c.id == alloc.device_id)
            .values(allocated_units=table.c.allocated_units - alloc.units)
        )
        node_id = await session.scalar(select(Device.node_id).where(Device.id == alloc.device_id))
        if node_id:
            nodes.add(node_id)
            publish_on(session, node_id, ChangeCause.ALLOCATION)
        await session.delete(alloc)
    return sorted(nodes)


async def node_has_allocations(session: AsyncSession, node_id: str) -> bool:
    held = await session.scalar(
        select(Device.id).where(Device.node_id == node_id, Device.allocated_units > 0).limit(1)
    )
    return held is not None
