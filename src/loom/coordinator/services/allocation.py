"""Device allocation: reserve and release devices atomically (placement reads
``coordinator.placement_index``).

Reservation is a conditional UPDATE (`allocated_units + u <= capacity`, per device), so two
coordinators — or two requests in one — can never hand out the same unit: the loser sees
rowcount 0, rolls back, and places again.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import ColumnElement, Table, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.bus import publish_on
from loom.coordinator.db.models import Allocation, Device
from loom.protocol.events import ChangeCause


class ReservationConflict(RuntimeError):
    """Someone else took a unit between placement and reservation; place again."""

    def __init__(self, message: str, device_id: str = "") -> None:
        super().__init__(message)
        self.device_id = device_id


def offered_expr(table: Table) -> ColumnElement[int]:
    """``core.challenge.capacity.offered_units(count, verified_units)`` in SQL (portable)."""
    claimed = func.coalesce(table.c.count, 1)
    units = case((claimed < 1, 1), else_=claimed)
    verified = table.c.verified_units
    return case(
        (verified.is_(None), units),
        (verified < units, case((verified < 1, 1), else_=verified)),
        else_=units,
    )


async def reserve(
    session: AsyncSession, member_id: str, device_ids: tuple[str, ...], units_each: int
) -> None:
    """Take ``units_each`` units of every device for ``member_id``, or raise
    ReservationConflict (the caller rolls back: a partial reservation never commits).

    One conditional UPDATE for the member's devices (ids of one node: bounded by the
    node, not the network), a device taking the units only while it has them free."""
    table = cast(Table, Device.__table__)
    wanted = sorted(set(device_ids))
    taken = await session.execute(
        update(table)
        .where(
            table.c.id.in_(wanted),
            table.c.allocated_units + units_each <= offered_expr(table),
        )
        .values(allocated_units=table.c.allocated_units + units_each)
        .returning(table.c.id, table.c.node_id)
    )
    got = {str(device_id): str(node_id) for device_id, node_id in taken}
    for node_id in sorted(set(got.values())):
        publish_on(session, node_id, ChangeCause.ALLOCATION)
    missing = [d for d in wanted if d not in got]
    if missing:
        raise ReservationConflict(f"device {missing[0]} was taken concurrently", missing[0])
    session.add_all(Allocation(member_id=member_id, device_id=d, units=units_each) for d in wanted)


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
