"""Nodes and their devices: registration, inventory, state transitions, listings.

Every function takes the database session explicitly; the caller commits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.bus import publish_on
from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import Device, Node, NodeEvent
from loom.coordinator.errors import BadRequest, NotFound
from loom.coordinator.services.reliability import node_scores
from loom.core.challenge.capacity import offered_units
from loom.core.models import DeviceKind, DeviceState, NodeState
from loom.core.money import AmountError, format_credits, parse_credits
from loom.protocol.api import DeviceOut, NodeOut, NodeUpdate
from loom.protocol.events import ChangeCause
from loom.protocol.messages import Inventory

# The transitions the coordinator allows (DESIGN.md §4). `banned` is terminal.
_ALLOWED: dict[NodeState, set[NodeState]] = {
    NodeState.REGISTERING: {
        NodeState.VERIFYING,
        NodeState.AVAILABLE,
        NodeState.OFFLINE,
        NodeState.DRAINED,
    },
    NodeState.VERIFYING: {
        NodeState.AVAILABLE,
        NodeState.OFFLINE,
        NodeState.DRAINED,
        NodeState.BANNED,
    },
    NodeState.AVAILABLE: {
        NodeState.ALLOCATED,
        NodeState.VERIFYING,
        NodeState.OFFLINE,
        NodeState.DRAINED,
        NodeState.BANNED,
    },
    NodeState.ALLOCATED: {
        NodeState.AVAILABLE,
        NodeState.OFFLINE,
        NodeState.DRAINED,
        NodeState.BANNED,
    },
    NodeState.OFFLINE: {
        NodeState.VERIFYING,
        NodeState.AVAILABLE,
        NodeState.REMOVED,
        NodeState.BANNED,
    },
    # A drained node comes back like an offline one; a late watchdog verdict may still
    # record it as offline (it is gone either way).
    NodeState.DRAINED: {
        NodeState.VERIFYING,
        NodeState.AVAILABLE,
        NodeState.OFFLINE,
        NodeState.REMOVED,
        NodeState.BANNED,
    },
    # Removed by its owner: kept on record (earnings, challenges) but never placed again.
    NodeState.REMOVED: set(),
    NodeState.BANNED: set(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class Registration:
    node_id: str
    node_key: str
    owner_key: str
    name: str
    region: str
    country: str
    price_micro: int
    price_auto: bool
    protocol: int
    agent_version: str
    inventory: Inventory


def transition(session: AsyncSession, node: Node, to: NodeState, reason: str, now: float) -> bool:
    """Move `node` to `to` and record the event; False when it is already there."""
    current = NodeState(node.state)
    if current == to:
        return False
    if to not in _ALLOWED[current]:
        raise IllegalTransition(f"node {node.id}: {current.value} → {to.value} is not allowed")
    session.add(
        NodeEvent(
            node_id=node.id, at=now, from_state=current.value, to_state=to.value, reason=reason
        )
    )
    node.state = to.value
    node.state_changed_at = now
    both_placeable = {current, to} <= {NodeState.AVAILABLE, NodeState.ALLOCATED}
    publish_on(
        session, node.id, ChangeCause.ALLOCATION if both_placeable else ChangeCause.NODE_STATE
    )
    return True


async def register(session: AsyncSession, reg: Registration, now: float) -> Node:
    """Create or refresh a node after a successful handshake and sync its devices."""
    node = await session.get(Node, reg.node_id)
    if node is None:
        node = Node(
            id=reg.node_id,
            node_key=reg.node_key,
            owner_key=reg.owner_key,
            state=NodeState.REGISTERING.value,
            state_changed_at=now,
            registered_at=now,
            heartbeats=0,
        )
        session.add(node)
        session.add(
            NodeEvent(
                node_id=reg.node_id,
                at=now,
                from_state="",
                to_state=NodeState.REGISTERING.value,
                reason="first handshake",
            )
        )
    node.owner_key = reg.owner_key
    node.name = reg.name
    node.region = reg.region
    node.country = reg.country
    node.price_micro = reg.price_micro
    node.price_auto = reg.price_auto
    node.protocol = reg.protocol
    node.agent_version = reg.agent_version
    node.connected_since = now
    node.last_heartbeat_at = now
    apply_inventory(node, reg.inventory)
    await sync_devices(session, node, reg.inventory)
    return node


def apply_inventory(node: Node, inv: Inventory) -> None:
    node.hostname = inv.hostname[:255]
    node.os = inv.os[:255]
    node.cpu_model = inv.cpu_model[:255]
    node.cpu_cores = inv.cpu_cores
    node.ram_mb = inv.ram_mb
    node.disk_free_mb = inv.disk_free_mb
    node.inventory_json = inv.model_dump_json()


async def sync_devices(session: AsyncSession, node: Node, inv: Inventory) -> list[Device]:
    """Make the device rows match the claimed inventory.

    A device keeps its id (and so its verification) while its model and identity stay the
    same; a device that changed model starts over as `claimed`; one that vanished is kept
    but marked not present so its history survives.
    """
    existing = {
        d.id: d
        for d in (await session.execute(select(Device).where(Device.node_id == node.id))).scalars()
    }
    wanted: dict[str, Device] = {}
    cpu_id = f"{node.id}:cpu"
    wanted[cpu_id] = Device(
        id=cpu_id,
        node_id=node.id,
        kind=DeviceKind.CPU.value,
        model="cpu",
        name=inv.cpu_model[:255],
        idx=None,
        count=inv.cpu_cores,
        vram_mb=None,
        uuid="",
        declared=False,
        state=DeviceState.CLAIMED.value,
        present=True,
    )
    for gpu in inv.gpus:
        dev_id = f"{node.id}:gpu{gpu.index}"
        wanted[dev_id] = Device(
            id=dev_id,
            node_id=node.id,
            kind=DeviceKind.GPU.value,
            model=gpu.model[:64],
            name=gpu.name[:255],
            idx=gpu.index,
            count=None,
            vram_mb=gpu.vram_mb,
            uuid=gpu.uuid[:128],
            declared=gpu.declared,
            state=DeviceState.CLAIMED.value,
            present=True,
        )
    result: list[Device] = []
    for dev_id, new in wanted.items():
        old = existing.pop(dev_id, None)
        if old is None:
            session.add(new)
            result.append(new)
            continue
        same = old.model == new.model and old.uuid == new.uuid and old.count == new.count
        if not same:
            old.state = DeviceState.CLAIMED.value
        old.model, old.name, old.idx, old.count = new.model, new.name, new.idx, new.count
        old.vram_mb, old.uuid, old.declared, old.present = (
            new.vram_mb,
            new.uuid,
            new.declared,
            True,
        )
        result.append(old)
    for gone in existing.values():
        gone.present = False
    publish_on(session, node.id, ChangeCause.NODE_FACTS)
    return result


async def get_node(session: AsyncSession, node_id: str) -> Node:
    node = await session.get(Node, node_id)
    if node is None:
        raise NotFound("node_not_found", f"no node with id {node_id!r}; see `loom nodes`")
    return node


async def list_nodes(
    session: AsyncSession, *, owner: str | None = None, state: str | None = None
) -> list[NodeOut]:
    query = select(Node).order_by(Node.registered_at, Node.id)
    if state != NodeState.REMOVED.value:
        query = query.where(Node.state != NodeState.REMOVED.value)
    if owner:
        query = query.where(Node.owner_key == owner)
    if state:
        query = query.where(Node.state == state)
    nodes = list((await session.execute(query)).scalars())
    devices = await devices_by_node(session, [n.id for n in nodes])
    scores = await node_scores(session, [n.id for n in nodes], now=time.time())
    return [
        node_out(n, devices.get(n.id, [])).model_copy(update={"reliability": scores[n.id]})
        for n in nodes
    ]


async def devices_by_node(session: AsyncSession, ids: Sequence[str]) -> dict[str, list[Device]]:
    out: dict[str, list[Device]] = {}
    for chunk in chunks(ids):  # bounded IN-lists: `loom node list` may name every node
        rows = await session.execute(
            select(Device)
            .where(Device.node_id.in_(chunk), Device.present.is_(True))
            .order_by(Device.id)
        )
        for dev in rows.scalars():
            out.setdefault(dev.node_id, []).append(dev)
    return out


def device_out(dev: Device) -> DeviceOut:
    return DeviceOut(
        id=dev.id,
        kind=dev.kind,
        model=dev.model,
        index=dev.idx,
        count=dev.count,
        vram_gb=round(dev.vram_mb / 1024, 1) if dev.vram_mb is not None else None,
        state=dev.state,
        verified=dev.state == DeviceState.VERIFIED.value,
    )


def node_out(node: Node, devices: Sequence[Device]) -> NodeOut:
    return NodeOut(
        id=node.id,
        name=node.name,
        owner=node.owner_key,
        state=node.state,
        region=node.region,
        country=node.country,
        price=format_credits(node.price_micro),
        last_heartbeat=node.last_heartbeat_at,
        connected_since=node.connected_since,
        cpu_model=node.cpu_model,
        # verified cores only (0 until the CPU challenge passes); the claim is the cpu
        # device's `count`, listed with its state
        cpu_cores=sum(
            offered_units(d.count, d.verified_units)
            for d in devices
            if d.kind == DeviceKind.CPU.value and d.state == DeviceState.VERIFIED.value
        ),
        ram_gb=round(node.ram_mb / 1024, 1),
        devices=[device_out(d) for d in devices],
    )


def load_json_lenient(text: str) -> dict[str, object]:
    """Stored JSON is read leniently: a damaged blob reads as empty, never crashes a listing."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def apply_update(node: Node, update: NodeUpdate) -> None:
    """Apply an owner's change; validates everything before touching the row."""
    price_micro, price_auto = node.price_micro, node.price_auto
    if update.price is not None:
        if update.price.strip().lower() == "auto":
            price_auto = True
        else:
            try:
                price_micro, price_auto = parse_credits(update.price), False
            except AmountError as exc:
                raise BadRequest("invalid_price", f"price: {exc}", field="price") from None
    if update.name is not None:
        node.name = update.name.strip()
    node.price_micro, node.price_auto = price_micro, price_auto
