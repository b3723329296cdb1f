"""Agent settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass
class AgentConfig:
    coordinator: str
    name: str
    region: str
    country: str
    price: str
    work_dir: Path
    runtime: str | None = None
    advertise_address: str = "127.0.0.1"
    agent_version: str = "0.1.0"
    heartbeat_interval_s: float | None = None  # None: what the coordinator says
    egress: str = "internet"  # members' path to the public internet: internet or none
    member_network: str = "10.201.0.0/16"  # private range of members' namespace addresses

    @property
    def ws_url(self) -> str:
        return agent_ws_url(self.coordinator)


def agent_ws_url(coordinator: str) -> str:
    """http://host:port → ws://host:port/v1/agent/ws (https → wss)."""
    parts = urlsplit(coordinator if "://" in coordinator else f"http://{coordinator}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"coordinator URL must be http(s)://HOST:PORT, got {coordinator!r}")
    return urlunsplit((scheme, parts.netloc, "/v1/agent/ws", "", ""))
