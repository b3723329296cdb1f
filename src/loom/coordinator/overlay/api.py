"""``POST /v1/clusters/{ref}/overlay``: a user certificate for a cluster's overlay.

Owner only (the signed caller must own the cluster). The body is the user's own Nebula
public key (generated on the user's machine, which keeps the private key); the answer is a
certificate for it carrying the cluster's group, so the members' firewalls admit it:
``loom cluster connect`` then reaches the head directly. Its address comes from the same
book as the members' and is freed with them; it lives as long as a member's certificate.
"""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter

from loom.coordinator.api.deps import CallerDep, SessionDep, StateDep
from loom.coordinator.errors import Conflict
from loom.coordinator.overlay.service import current
from loom.coordinator.services import clusters as cluster_service
from loom.protocol.overlay import OverlayGrant, OverlayJoin

router = APIRouter(prefix="/v1", tags=["clusters"])


@router.post("/clusters/{ref}/overlay", response_model=OverlayGrant)
async def user_certificate(
    ref: str, body: OverlayJoin, session: SessionDep, state: StateDep, caller: CallerDep
) -> OverlayGrant:
    """A certificate that joins this machine to the cluster's overlay (owner only)."""
    cluster = await cluster_service.get_cluster(session, caller, ref)
    overlay = current(state)
    if overlay is None:
        raise Conflict(
            "overlay_off",
            "this coordinator runs no overlay (start it with --overlay-listen); "
            "use `loom cluster forward` instead",
        )
    if cluster.state != "running":
        raise Conflict("cluster_not_running", f"cluster {cluster.name} is {cluster.state}")
    name = f"u-{secrets.token_hex(5)}"
    return await asyncio.to_thread(
        overlay.authority.grant, cluster.id, name, cluster.expires_at, body.public_key
    )
