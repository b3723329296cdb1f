"""Messages on the agent WebSocket (the control plane).

Every frame is one JSON object with a `type`. Messages received from a peer are parsed
leniently (`extra="ignore"`) so that a newer peer's added fields do not break an older
one; the `type` and the required fields are still checked.

Handshake::

    coordinator → agent   hello   {protocol, nonce}
    agent → coordinator   auth    {protocol, node_key, owner_key, binding_sig, nonce_sig, …}
    coordinator → agent   welcome {node_id, heartbeat_interval_s}  (or a close with a reason)

Then, both ways: heartbeat/inventory/report up; command down, each answered by an ack.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# WebSocket close codes (4000–4999 are for applications).
CLOSE_AUTH_FAILED = 4001
CLOSE_PROTOCOL_TOO_OLD = 4002
CLOSE_BAD_MESSAGE = 4003
CLOSE_BANNED = 4004
CLOSE_REPLACED = 4005
CLOSE_SHUTTING_DOWN = 4006
CLOSE_STALE = 4007
#: The handshake took too long (a loaded machine): not the agent's fault, so it retries.
CLOSE_HANDSHAKE_TIMEOUT = 4008

#: Largest frame either side accepts.
MAX_FRAME_BYTES = 1 << 20


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class GpuInfo(_Msg):
    index: int
    model: str = Field(description="normalized slug, e.g. rtx4090 (or the raw name if unknown)")
    name: str = Field(description="display name as the driver reports it")
    vram_mb: int
    uuid: str = ""
    driver: str = ""
    compute_capability: str = ""
    declared: bool = Field(default=False, description="declared by the operator, not probed")


class Inventory(_Msg):
    cpu_model: str
    cpu_cores: int
    ram_mb: int
    disk_free_mb: int
    gpus: list[GpuInfo] = Field(default_factory=list)
    hostname: str = ""
    os: str = ""
    ray_version: str = ""
    runtimes: list[str] = Field(default_factory=list)


class Load(_Msg):
    cpu_percent: float = 0.0
    mem_used_mb: int = 0
    gpu_util_percent: list[float] = Field(default_factory=list)


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    protocol: int
    min_protocol: int
    nonce: str


class Auth(_Msg):
    type: Literal["auth"] = "auth"
    protocol: int
    agent_version: str = ""
    node_key: str
    owner_key: str
    binding_sig: str
    nonce_sig: str
    name: str
    region: str
    country: str = ""
    price: str = Field(description="credits per device-hour as a decimal string, or 'auto'")
    inventory: Inventory


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    node_id: str
    heartbeat_interval_s: float
    state: str


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    seq: int
    load: Load = Field(default_factory=Load)


class HeartbeatAck(_Msg):
    """Answers a heartbeat: the agent learns the link is alive and measures round trips."""

    type: Literal["heartbeat_ack"] = "heartbeat_ack"
    seq: int


class InventoryUpdate(_Msg):
    type: Literal["inventory"] = "inventory"
    inventory: Inventory


class Drain(_Msg):
    """The agent is shutting down on purpose (SIGTERM): no more work for it."""

    type: Literal["drain"] = "drain"
    reason: str = ""


class Report(_Msg):
    """A fact the agent observed (a member became ready, a Ray node died, …)."""

    type: Literal["report"] = "report"
    kind: str
    data: dict[str, Any] = Field(default_factory=dict)


class Command(_Msg):
    type: Literal["command"] = "command"
    id: str
    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class Ack(_Msg):
    type: Literal["ack"] = "ack"
    id: str
    ok: bool
    error: str = ""
    result: dict[str, Any] = Field(default_factory=dict)


class ErrorMsg(_Msg):
    type: Literal["error"] = "error"
    code: str
    message: str


AgentToCoordinator = Annotated[
    Heartbeat | InventoryUpdate | Drain | Report | Ack,
    Field(discriminator="type"),
]
CoordinatorToAgent = Annotated[Command | HeartbeatAck | ErrorMsg, Field(discriminator="type")]

agent_message_adapter: TypeAdapter[AgentToCoordinator] = TypeAdapter(AgentToCoordinator)
coordinator_message_adapter: TypeAdapter[CoordinatorToAgent] = TypeAdapter(CoordinatorToAgent)


def dump(message: BaseModel) -> str:
    return message.model_dump_json()
