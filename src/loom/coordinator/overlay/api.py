"""``POST /v1/clusters/{ref}/overlay``: a user certificate for a cluster's overlay.

Owner only (the signed caller must own the cluster). The body is the user's own Nebula
public key (generated on the user's machine, which keeps the private key); the answer is a
certificate for it carrying the cluster's group, so the members' firewalls admit it:
``loom cluster connect`` then reaches the head directly. Its address comes from the same
book as the members' and is freed with them; it lives as long as a member's certificate.

``POST /v1/clusters/{ref}/overlay/{name}/renew`` (owner only, the same public key) signs
a fresh certificate for the same name and address: ``loom cluster connect`` renews while it
runs. ``DELETE /v1/clusters/{ref}/overlay/{name}`` (owner only) revokes a user certificate before
it expires: ``name`` is the certificate's own (``u-…``, ``nebula-cert print``); its
fingerprint joins the cluster's blocklist, pushed to the lighthouse and every member.
"""

from __future__ import annotations

import secrets

from fastapi import APIRouter

from loom.coordinator.api.deps import CallerDep, SessionDep, StateDep
from loom.coordinator.errors import Conflict, NotFound
from loom.coordinator.overlay.book import GrantRefused
from loom.coordinator.overlay.service import Overlay, current, revoke
from loom.coordinator.services import clusters as cluster_service
from loom.protocol.overlay import OverlayGrant, OverlayJoin, OverlayRevoked

router = APIRouter(prefix="/v1", tags=["clusters"])
#: User certificates' names (members' are their ids, ``m-…``).
USER_PREFIX = "u-"


@router.post("/clusters/{ref}/overlay", response_model=OverlayGrant)
async def user_certificate(
    ref: str, body: OverlayJoin, session: SessionDep, state: StateDep, caller: CallerDep
) -> OverlayGrant:
    """A certificate that joins this machine to the cluster's overlay (owner only)."""
    cluster = await cluster_service.get_cluster(session, caller, ref)
    overlay = _overlay(state)
    if cluster.state != "running":
        raise Conflict("cluster_not_running", f"cluster {cluster.name} is {cluster.state}")
    name = f"{USER_PREFIX}{secrets.token_hex(5)}"
    try:
        return await overlay.book.grant(cluster.id, name, cluster.expires_at, body.public_key)
    except GrantRefused:
        raise Conflict("cluster_not_running", f"cluster {cluster.name} ended meanwhile") from None


@router.post("/clusters/{ref}/overlay/{name}/renew", response_model=OverlayGrant)
async def renew_user_certificate(
    ref: str, name: str, body: OverlayJoin, session: SessionDep, state: StateDep, caller: CallerDep
) -> OverlayGrant:
    """A fresh certificate for one of this cluster's user certificates: the same name,
    address and key (``loom cluster connect`` renews while it runs; owner only)."""
    cluster = await cluster_service.get_cluster(session, caller, ref)
    overlay = _overlay(state)
    if cluster.state != "running":
        raise Conflict("cluster_not_running", f"cluster {cluster.name} is {cluster.state}")
    entry = await overlay.book.entry(name)
    if not name.startswith(USER_PREFIX) or entry is None or entry.cluster != cluster.id:
        raise _no_user_certificate(cluster.name, name)
    if entry.pub.strip() != body.public_key.strip():
        raise Conflict(
            "overlay_key_mismatch",
            f"{name} was signed for another public key: renew with the key it was signed "
            "for, or join again (POST /v1/clusters/{ref}/overlay)",
        )
    grant = await overlay.book.renew_grant(name, cluster.expires_at)
    if grant is None:
        raise _no_user_certificate(cluster.name, name)
    return grant


@router.delete("/clusters/{ref}/overlay/{name}", response_model=OverlayRevoked)
async def drop_user_certificate(
    ref: str, name: str, session: SessionDep, state: StateDep, caller: CallerDep
) -> OverlayRevoked:
    """Revoke one of this cluster's user certificates now (owner only)."""
    cluster = await cluster_service.get_cluster(session, caller, ref)
    overlay = _overlay(state)
    entry = await overlay.book.entry(name)
    if not name.startswith(USER_PREFIX) or entry is None or entry.cluster != cluster.id:
        raise _no_user_certificate(cluster.name, name)
    blocked = await revoke(state, cluster.id, [name])
    return OverlayRevoked(name=name, fingerprints=blocked)


def _no_user_certificate(cluster: str, name: str) -> NotFound:
    return NotFound(
        "overlay_certificate_not_found",
        f"cluster {cluster} has no user certificate {name[:80]!r} (the name is the "
        "certificate's own, u-…, as `nebula-cert print` shows it; revoked ones are gone)",
    )


def _overlay(state: object) -> Overlay:
    overlay = current(state)
    if overlay is None:
        raise Conflict(
            "overlay_off",
            "this coordinator runs no overlay (start it with --overlay-listen); "
            "use `loom cluster forward` instead",
        )
    return overlay
