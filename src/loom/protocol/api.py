"""HTTP API schemas shared by the coordinator, the SDK and the CLI.

Request bodies are user input and refuse unknown fields; responses are read leniently by
the SDK so that a newer coordinator can add fields.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class UserInput(BaseModel):
    """Base for request bodies: unknown fields are refused with their path."""

    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorDetail(Response):
    code: str = Field(description="stable machine-readable code, e.g. auth_bad_signature")
    message: str = Field(description="what went wrong and what to change")
    field: str | None = None


class ErrorBody(Response):
    error: ErrorDetail


class DeviceOut(Response):
    id: str
    kind: str = Field(description="gpu | cpu")
    model: str
    index: int | None = None
    count: int | None = None
    vram_gb: float | None = None
    state: str
    verified: bool
    allocated: bool = False


class NodeOut(Response):
    id: str
    name: str
    owner: str
    state: str
    region: str
    country: str
    price: str = Field(description="credits per device-hour")
    last_heartbeat: float | None = Field(description="unix seconds")
    connected_since: float | None = None
    cpu_model: str = ""
    cpu_cores: int = Field(
        default=0, description="verified CPU cores (0 until the CPU challenge passes)"
    )
    ram_gb: float = 0.0
    devices: list[DeviceOut] = Field(default_factory=list)
    reliability: float = 0.0


class AccountOut(Response):
    key: str
    created_at: float
    nodes: int = 0


class Health(Response):
    status: str
    version: str
    protocol: int
    database: str


class NodeUpdate(UserInput):
    """What a node's owner may change from the API."""

    price: str | None = Field(
        default=None,
        max_length=32,
        description="credits per device-hour as a decimal string, or 'auto'",
    )
    name: str | None = Field(default=None, min_length=1, max_length=128)


class ClusterCreate(UserInput):
    """`spec` is the cluster spec mapping (as in cluster.yaml); validated by the coordinator."""

    spec: dict[str, object]


class MemberOut(Response):
    id: str
    node_id: str
    node_name: str = ""
    role: str
    state: str
    devices: list[str] = Field(default_factory=list)
    model: str = ""
    units: int = 0
    price: str = ""
    reason: str = ""
    ready_at: float | None = None
    ended_at: float | None = None
    confirmed: bool = Field(
        default=False,
        description="someone other than its own agent vouches that it runs: billed only then",
    )
    confirm_reason: str = ""
    overlay_ip: str = Field(
        default="", description="its address on the cluster's Nebula overlay ('' = no overlay)"
    )
    relayed: bool | None = Field(
        default=None, description="its overlay traffic goes through the coordinator's relay"
    )


class ClusterEventOut(Response):
    at: float
    from_state: str
    to_state: str
    reason: str


class ClusterOut(Response):
    id: str
    name: str
    owner: str
    state: str
    reason: str = ""
    head_address: str = ""
    dashboard_url: str = ""
    client_address: str = ""
    ray_token: str = Field(default="", description="only shown to the cluster's owner")
    price_per_hour: str = "0"
    created_at: float
    ready_at: float | None = None
    expires_at: float
    ended_at: float | None = None
    members: list[MemberOut] = Field(default_factory=list)
    events: list[ClusterEventOut] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    spec: dict[str, object] = Field(default_factory=dict)
