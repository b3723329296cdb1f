"""Clusters (signed; a user sees and controls only their own)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query

from loom.coordinator.api.deps import CallerDep, SessionDep, StateDep
from loom.coordinator.db.models import Cluster
from loom.coordinator.errors import Conflict
from loom.coordinator.loops.clusters import wait_ended
from loom.coordinator.overlay import service as overlay_service
from loom.coordinator.services import clusters as cluster_service
from loom.core.models import ClusterState
from loom.protocol.api import ClusterCreate, ClusterOut

router = APIRouter(prefix="/v1", tags=["clusters"])

#: How long DELETE waits for the reconciler to finish the teardown (the SDK waits 120 s;
#: a member start in flight may take up to 90 s before the teardown can begin).
DOWN_WAIT_S = 110.0


@router.post("/clusters", response_model=ClusterOut, status_code=201)
async def create_cluster(
    body: ClusterCreate, session: SessionDep, state: StateDep, caller: CallerDep
) -> ClusterOut:
    """Validate the spec, place it, reserve the devices; the reconciler provisions it.

    Placement and reservation stay in the request, so a spec that cannot be placed is a
    422/409 at once; the row is committed `provisioning` and the reconciler is woken.
    """
    spec = cluster_service.parse_user_spec(body.spec)
    cluster = await cluster_service.create_cluster(
        session,
        caller,
        spec,
        time.time(),
        connected=state.hub.present,
        require_verified=state.settings.require_verified,
        index=state.placement,
    )
    state.clusters_wake.set()  # create_cluster committed it
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
    return await overlay_service.annotate(
        state, await cluster_service.cluster_out(session, cluster)
    )


@router.delete("/clusters/{ref}", response_model=ClusterOut)
async def delete_cluster(
    ref: str, session: SessionDep, state: StateDep, caller: CallerDep
) -> ClusterOut:
    """Tear the cluster down: marked `terminating`; the reconciler stops every member and
    frees its devices. Waits (bounded) until it ended, so `loom cluster down` shows the end."""
    cluster = await cluster_service.get_cluster(session, caller, ref)
    cluster_id = cluster.id
    locked = await session.get(Cluster, cluster_id, with_for_update=True, populate_existing=True)
    assert locked is not None
    if locked.state in (ClusterState.TERMINATED.value, ClusterState.FAILED.value):
        raise Conflict("cluster_ended", f"cluster {locked.name} already ended ({locked.state})")
    if locked.state == ClusterState.REQUESTED.value:
        raise Conflict("cluster_creating", f"cluster {locked.name} is still being created; retry")
    cluster_service.transition(
        session, locked, ClusterState.TERMINATING, "down requested by owner", time.time()
    )
    await session.commit()
    state.clusters_wake.set()
    await wait_ended(state, cluster_id, timeout=DOWN_WAIT_S)
    session.expire_all()
    cluster = await cluster_service.get_cluster(session, caller, cluster_id)
    return await cluster_service.cluster_out(session, cluster)
