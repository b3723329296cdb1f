"""The overlay as the rest of the coordinator sees it.

``install(state)`` at start-up (when ``--overlay-listen`` is given), ``grant_args`` for
every ``member.start``, ``release`` when a cluster ends, ``member_fields`` for the status.
With the overlay off every call is a no-op and members use the agents' addresses.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom.coordinator.config import Settings
from loom.coordinator.overlay.authority import (
    Authority,
    OverlayConfigError,
    OverlaySettings,
    nebula_cert,
)
from loom.coordinator.overlay.lighthouse import Lighthouse, nebula_binary
from loom.protocol.api import ClusterOut
from loom.protocol.commands import MemberStart
from loom.protocol.messages import Report

log = logging.getLogger(__name__)


@dataclass
class Overlay:
    authority: Authority
    lighthouse: Lighthouse
    task: asyncio.Task[None] | None = None
    #: member id -> whether its agent reported its tunnels going through the relay
    relayed: dict[str, bool] = field(default_factory=dict)


def overlay_settings(settings: Settings) -> OverlaySettings | None:
    """The overlay options, or None when the overlay is off (no ``--overlay-listen``)."""
    if not settings.overlay_listen:
        return None
    data_dir = Path(settings.overlay_dir) if settings.overlay_dir else None
    if data_dir is None:
        from loom.protocol.keystore import loom_home

        data_dir = loom_home() / "overlay"
    return OverlaySettings(
        listen=settings.overlay_listen,
        advertise=settings.overlay_advertise,
        network=settings.overlay_network,
        data_dir=data_dir,
    )


async def install(state: Any) -> Overlay | None:
    """Create the CA (first time), start and supervise the lighthouse; sets state.overlay."""
    config = overlay_settings(state.settings)
    if config is None:
        return None
    authority = await asyncio.to_thread(Authority, config)
    lighthouse = Lighthouse(authority)
    await lighthouse.start()
    overlay = Overlay(authority, lighthouse)
    overlay.task = asyncio.create_task(lighthouse.run(), name="overlay-lighthouse")
    state.tasks.append(overlay.task)
    state.overlay = overlay

    async def on_overlay_report(_node_id: str, report: Report, _at: float) -> None:
        member_id = str(report.data.get("member_id", ""))
        if authority.address_of(member_id) is not None:  # a member the overlay knows
            overlay.relayed[member_id] = bool(report.data.get("relayed"))

    state.hub.on_report("member.overlay", on_overlay_report)
    return overlay


def current(state: Any) -> Overlay | None:
    """The running overlay of this coordinator, or None."""
    overlay = getattr(state, "overlay", None)
    return overlay if isinstance(overlay, Overlay) else None


async def grant_args(
    state: Any, command: MemberStart, cluster_id: str, member_id: str, ends_at: float | None
) -> MemberStart:
    """``member.start`` with the member's overlay grant (unchanged when off)."""
    overlay = current(state)
    if overlay is None:
        return command
    grant = await asyncio.to_thread(overlay.authority.grant, cluster_id, member_id, ends_at)
    return command.model_copy(update={"overlay": grant})


def release(state: Any, cluster_id: str) -> None:
    """Free the overlay addresses of a cluster that ended."""
    overlay = current(state)
    if overlay is not None:
        for member_id in overlay.authority.release_cluster(cluster_id):
            overlay.relayed.pop(member_id, None)


def member_overlay_ip(state: Any, member_id: str) -> str | None:
    overlay = current(state)
    return None if overlay is None else overlay.authority.address_of(member_id)


def check_overlay(settings: Settings) -> None:
    """Raise OverlayConfigError (a clear message) if the overlay options cannot work."""
    config = overlay_settings(settings)
    if config is None:
        return
    _ = config.net, config.listen_port, config.advertised()
    nebula_cert()
    nebula_binary()
    for item in config.advertised():
        host = item.rpartition(":")[0].strip("[]")
        if host in ("0.0.0.0", "::"):
            raise OverlayConfigError(
                f"--overlay-advertise {item!r}: members need a reachable address, "
                "not a wildcard (give the coordinator's public address)"
            )


def annotate(state: Any, out: ClusterOut) -> ClusterOut:
    """The cluster status with each member's overlay address (and relay use, if known)."""
    overlay = current(state)
    if overlay is None:
        return out
    members = [
        m.model_copy(
            update={
                "overlay_ip": overlay.authority.address_of(m.id) or "",
                "relayed": overlay.relayed.get(m.id),
            }
        )
        for m in out.members
    ]
    return out.model_copy(update={"members": members})
