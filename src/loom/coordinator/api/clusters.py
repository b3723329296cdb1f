"""Clusters (signed; a user sees and controls only their own)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query

from loom.coordinator import provisioner
from loom.coordinator.api.deps import CallerDep, SessionDep, StateDep
from loom.coordinator.errors import Conflict
from loom.coordinator.overlay import service as overlay_service
from loom.coordinator.services import clusters as cluster_service
from loom.core.models import ClusterState
from loom.protocol.api import ClusterCreate, ClusterOut

router = APIRouter(prefix="/v1", tags=["clusters"])


@router.post("/clusters", response_model=ClusterOut, status_code=201)
async def create_cluster(
    body: ClusterCreate, session: SessionDep, state: StateDep, caller: CallerDep
) -> ClusterOut:
    """Validate the spec, place it, reserve the devices, and start provisioning."""
    spec = cluster_service.parse_user_spec(body.spec)
    cluster = await cluster_service.create_cluster(
        session,
        caller,
        spec,
        time.time(),
        connected=state.hub.connections.keys(),
        require_verified=state.settings.require_verified,
        index=state.placement,
    )
    state.drive(cluster.id, provisioner.provision(state, cluster.id))
    return await cluster_service.cluster_out(session, cluster)


@router.get("/clusters", response_model=list[ClusterOut])
async def list_clusters(
    session: SessionDep,
    caller: CallerDep,
    all_states: bool = Query(default=False, alias="all", description="include ended clusters"),
) -> list[ClusterOut]:
    clusters = await cluster_service.list_clusters(session, caller, all_states=all_states)
    return [await cluster_service.cluster_out(session, c, detail=False) for c in clusters]


@router.get("/clusters/{ref}", response_model=ClusterOut)
async def get_cluster(
    ref: str, session: SessionDep, state: StateDep, caller: CallerDep
) -> ClusterOut:
    cluster = await cluster_service.get_cluster(session, caller, ref)
    return overlay_service.annotate(state, await cluster_service.cluster_out(session, cluster))


@router.delete("/clusters/{ref}", response_model=ClusterOut)
async def delete_cluster(
    ref: str, session: SessionDep, state: StateDep, caller: CallerDep
) -> ClusterOut:
    """Tear the cluster down: stop every member and free its devices (waits until done)."""
    cluster = await cluster_service.get_cluster(session, caller, ref)
    if cluster.state in (ClusterState.TERMINATED.value, ClusterState.FAILED.value):
        raise Conflict("cluster_ended", f"cluster {cluster.name} already ended ({cluster.state})")
    cluster_id = cluster.id
    await session.commit()
    state.driving.add(cluster_id)
    try:
        await provisioner.teardown(state, cluster_id, reason="down requested by owner")
    finally:
        state.driving.discard(cluster_id)
    session.expire_all()
    cluster = await cluster_service.get_cluster(session, caller, cluster_id)
    return await cluster_service.cluster_out(session, cluster)
