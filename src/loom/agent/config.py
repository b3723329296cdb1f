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
        """The first coordinator's agent endpoint."""
        return self.ws_urls[0]

    @property
    def ws_urls(self) -> list[str]:
        """Every coordinator replica's agent endpoint (``coordinator`` is URL1,URL2,…)."""
        return agent_ws_urls(self.coordinator)


def agent_ws_urls(coordinators: str) -> list[str]:
    """``URL1,URL2,…`` → their agent endpoints, in order; at least one."""
    urls = [agent_ws_url(u.strip()) for u in coordinators.split(",") if u.strip()]
    if not urls:
        raise ValueError("give at least one coordinator URL, e.g. http://HOST:8700")
    return urls


def agent_ws_url(coordinator: str) -> str:
    """http://host:port → ws://host:port/v1/agent/ws (https → wss)."""
    parts = urlsplit(coordinator if "://" in coordinator else f"http://{coordinator}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"coordinator URL must be http(s)://HOST:PORT, got {coordinator!r}")
    return urlunsplit((scheme, parts.netloc, "/v1/agent/ws", "", ""))
