"""`GET /metrics`: Prometheus text format, for the operator's dashboards (unsigned).

Gauges that live in the database are read at scrape time in a handful of GROUP BY
queries; latency histograms are filled as requests and placements happen.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from loom.coordinator.api.deps import StateDep
from loom.coordinator.db.models import (
    Cluster,
    Device,
    DeviceChallenge,
    LedgerTransaction,
    Member,
    Node,
)
from loom.coordinator.loops.explorer import ExplorerState
from loom.coordinator.services import explorer as explorer_service
from loom.coordinator.services.explorer_ledger import totals_micro
from loom.coordinator.state import CoordinatorState

router = APIRouter(tags=["metrics"])


async def refresh(state: CoordinatorState, explorer: ExplorerState) -> None:
    snap = explorer.metrics.snapshot
    async with state.session() as session:
        snap.nodes_by_state = {
            s: int(n)
            for s, n in await session.execute(select(Node.state, func.count()).group_by(Node.state))
        }
        snap.devices_by_state = {
            (k, s): int(n)
            for k, s, n in await session.execute(
                select(Device.kind, Device.state, func.count())
                .where(Device.present.is_(True))
                .group_by(Device.kind, Device.state)
            )
        }
        snap.clusters_by_state = {
            s: int(n)
            for s, n in await session.execute(
                select(Cluster.state, func.count()).group_by(Cluster.state)
            )
        }
        snap.members_by_state = {
            s: int(n)
            for s, n in await session.execute(
                select(Member.state, func.count()).group_by(Member.state)
            )
        }
        snap.challenges_by_outcome = {
            o: int(n)
            for o, n in await session.execute(
                select(DeviceChallenge.outcome, func.count()).group_by(DeviceChallenge.outcome)
            )
        }
        snap.ledger_by_kind = {
            k: int(n)
            for k, n in await session.execute(
                select(LedgerTransaction.kind, func.count()).group_by(LedgerTransaction.kind)
            )
        }
        snap.ledger_totals = await totals_micro(session)
        util = await explorer_service.utilization_now(session)
    snap.utilization = {
        kind: float(util[f"{kind}_ratio"])
        for kind in ("gpu", "cpu")
        if util[f"{kind}_ratio"] is not None
    }
    snap.heartbeats_total = state.hub.heartbeats.total
    snap.heartbeats_per_s = explorer.rate.rate()
    snap.agents_connected = len(state.hub.connections)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, state: StateDep) -> Response:
    explorer: ExplorerState = request.app.state.explorer
    await refresh(state, explorer)
    return Response(generate_latest(explorer.metrics.registry), media_type=CONTENT_TYPE_LATEST)
