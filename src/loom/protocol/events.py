"""Typed change events between the code that changes placeability and the placement index.

Published on the coordinator's event bus (``loom.coordinator.bus``): in-process today, the
same models serialise to JSON (``model_dump_json``) so that a NATS-backed bus can carry them
between replicas. An event names *what* changed, never the new values: a subscriber re-reads
the node from the database (the only source of truth), so a late or duplicated event is
harmless and a lost one is repaired by the index's periodic resync.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class ChangeCause(StrEnum):
    NODE_STATE = "node_state"  # online, offline, banned, allocated, available
    NODE_FACTS = "node_facts"  # registration, inventory, region, RAM, price update
    PRICE = "price"  # `--price auto` refresh
    DEVICE_VERDICT = "device_verdict"  # verified / failed by a challenge
    ALLOCATION = "allocation"  # units reserved or released
    RELIABILITY = "reliability"  # an input of the node's reliability score changed


class NodeChanged(BaseModel):
    """Something placement reads about ``node_id`` (its facts, devices or score) changed."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    type: Literal["node.changed"] = "node.changed"
    node_id: str
    cause: ChangeCause


class NodePresence(BaseModel):
    """The agent of ``node_id`` connected to or disconnected from this coordinator."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    type: Literal["node.presence"] = "node.presence"
    node_id: str
    connected: bool


PlacementEvent = Annotated[NodeChanged | NodePresence, Field(discriminator="type")]
PLACEMENT_EVENT: TypeAdapter[NodeChanged | NodePresence] = TypeAdapter(PlacementEvent)


def parse_event(data: str | bytes) -> NodeChanged | NodePresence:
    """An event from its JSON (what a NATS subscriber receives)."""
    return PLACEMENT_EVENT.validate_json(data)
