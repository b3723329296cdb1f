"""Nodes and accounts (signed)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from loom.coordinator.api.deps import CallerDep, SessionDep, StateDep
from loom.coordinator.bus import publish_on
from loom.coordinator.db.models import Node
from loom.coordinator.errors import BadRequest, Conflict, Forbidden
from loom.coordinator.services import auth as auth_service
from loom.coordinator.services import nodes as node_service
from loom.core.models import NodeState
from loom.protocol.api import AccountOut, NodeOut, NodeUpdate
from loom.protocol.events import ChangeCause
from loom.protocol.identity import IdentityError, parse_key_hex

router = APIRouter(prefix="/v1", tags=["nodes"])


@router.get("/nodes", response_model=list[NodeOut])
async def list_nodes(
    session: SessionDep,
    _caller: CallerDep,
    owner: str | None = Query(
        default=None, max_length=200, description="only this owner's nodes (64 lower-case hex)"
    ),
    state: str | None = Query(default=None, max_length=16, description="only nodes in this state"),
) -> list[NodeOut]:
    if owner is not None:
        try:
            parse_key_hex(owner, "owner")
        except IdentityError as exc:
            raise BadRequest("invalid_key", str(exc), field="owner") from None
    if state is not None and state not in {s.value for s in NodeState}:
        names = ", ".join(s.value for s in NodeState)
        raise BadRequest(
            "invalid_state", f"unknown node state {state!r}; use one of: {names}", field="state"
        )
    return await node_service.list_nodes(session, owner=owner, state=state)


@router.get("/nodes/{node_id}", response_model=NodeOut)
async def get_node(node_id: str, session: SessionDep, _caller: CallerDep) -> NodeOut:
    node = await node_service.get_node(session, node_id)
    devices = await node_service.devices_by_node(session, [node.id])
    return node_service.node_out(node, devices.get(node.id, []))


@router.get("/me", response_model=AccountOut, tags=["accounts"])
async def me(session: SessionDep, caller: CallerDep) -> AccountOut:
    account = await auth_service.get_account(session, caller)
    assert account is not None  # signed_caller created it
    count = await session.scalar(
        select(func.count()).select_from(Node).where(Node.owner_key == caller)
    )
    return AccountOut(key=caller, created_at=account.created_at, nodes=int(count or 0))


@router.patch("/nodes/{node_id}", response_model=NodeOut)
async def update_node(
    node_id: str, body: NodeUpdate, session: SessionDep, caller: CallerDep
) -> NodeOut:
    """Change a node's price or name (its owner only)."""
    node = await node_service.get_node(session, node_id)
    if node.owner_key != caller:
        raise Forbidden(
            "not_owner", f"node {node_id} belongs to another key; only its owner may change it"
        )
    node_service.apply_update(node, body)
    publish_on(session, node.id, ChangeCause.PRICE)
    await session.commit()
    devices = await node_service.devices_by_node(session, [node.id])
    return node_service.node_out(node, devices.get(node.id, []))


@router.delete("/nodes/{node_id}", response_model=NodeOut)
async def remove_node(
    node_id: str, session: SessionDep, caller: CallerDep, state: StateDep
) -> NodeOut:
    """Remove a node from the network (its owner only; its agent must be stopped first).

    The row stays on record (earnings, challenges, the ledger refer to it) in the
    terminal state ``removed``: never listed by default, never placed, and its node key
    is refused at the handshake. A banned node cannot be removed (its record stays).
    """
    node = await node_service.get_node(session, node_id)
    if node.owner_key != caller:
        raise Forbidden(
            "not_owner", f"node {node_id} belongs to another key; only its owner may remove it"
        )
    if node.state == NodeState.BANNED.value:
        raise Conflict("node_banned", f"node {node_id} is banned; its record stays")
    if node.state == NodeState.REMOVED.value:
        raise Conflict("node_removed", f"node {node_id} is already removed")
    if state.hub.is_connected(node.id) or node.state not in (
        NodeState.OFFLINE.value,
        NodeState.DRAINED.value,
    ):
        raise Conflict(
            "node_connected",
            f"node {node_id} is {node.state}: stop its agent first (Ctrl-C or SIGTERM on "
            "`loom worker start`), then remove it",
        )
    node_service.transition(session, node, NodeState.REMOVED, "removed by its owner", time.time())
    await session.commit()
    devices = await node_service.devices_by_node(session, [node.id])
    return node_service.node_out(node, devices.get(node.id, []))
