"""Device allocation: reserve and release devices atomically (placement reads
``coordinator.placement_index``).

Reservation is a conditional UPDATE per device (`allocated_units + u <= capacity`), so two
coordinators — or two requests in one — can never hand out the same unit: the loser sees
rowcount 0, rolls back, and places again.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.bus import publish_on
from loom.coordinator.db.models import Allocation, Device
from loom.core.challenge.capacity import offered_units
from loom.protocol.events import ChangeCause


class ReservationConflict(RuntimeError):
    """Someone else took a unit between placement and reservation; place again."""

    def __init__(self, message: str, device_id: str = "") -> None:
        super().__init__(message)
        self.device_id = device_id


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
