"""The explorer: public pages at `/`, and the unsigned, read-only JSON they poll under
`/explorer/api/…` (public and aggregate facts only; see services/explorer.py).

Each page's first view is rendered on the server from the same JSON its script then polls
(data in the HTML: useful with scripts blocked); every asset ships inside the
`loom.explorer` package, so the explorer works with no internet.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse

from loom import explorer as assets
from loom.coordinator.api import metrics as metrics_api
from loom.coordinator.api.deps import SessionDep, StateDep
from loom.coordinator.errors import NotFound
from loom.coordinator.loops import explorer as explorer_loops
from loom.coordinator.metrics import MetricsMiddleware
from loom.coordinator.services import explorer as service
from loom.coordinator.services import explorer_ledger

Json = dict[str, Any]

pages = APIRouter(include_in_schema=False)
router = APIRouter(prefix="/explorer/api", tags=["explorer"])
NO_STORE = {"Cache-Control": "no-store"}


def _explorer(request: Request) -> explorer_loops.ExplorerState:
    state: explorer_loops.ExplorerState = request.app.state.explorer
    return state


# --------------------------------------------------------------------------- pages


def _page(name: str, title: str, data: Any = None, api_path: str = "") -> HTMLResponse:
    """The page with its first view rendered from `data` (what its script would fetch)."""
    return HTMLResponse(assets.page(name, title, data, api_path), headers=NO_STORE)


@pages.get("/", response_class=HTMLResponse)
async def overview_page(request: Request, session: SessionDep) -> HTMLResponse:
    return _page("overview", "Network", await overview(request, session), "/overview")


@pages.get("/nodes", response_class=HTMLResponse)
async def nodes_page(session: SessionDep, state: StateDep) -> HTMLResponse:
    return _page("nodes", "Nodes", await nodes(session, state), "/nodes")


@pages.get("/nodes/{node_id}", response_class=HTMLResponse)
async def node_page(node_id: str, session: SessionDep, state: StateDep) -> HTMLResponse:
    try:
        data: Json | None = await node(node_id, session, state)
    except NotFound:
        data = None  # the script shows "not found"
    return _page("node", f"Node {node_id[:12]}", data, f"/nodes/{quote(node_id, safe='')}")


@pages.get("/clusters", response_class=HTMLResponse)
async def clusters_page(session: SessionDep) -> HTMLResponse:
    return _page("clusters", "Clusters", await clusters(session), "/clusters")


@pages.get("/clusters/{cluster_id}", response_class=HTMLResponse)
async def cluster_page(cluster_id: str, session: SessionDep) -> HTMLResponse:
    try:
        data: Json | None = await cluster(cluster_id, session)
    except NotFound:
        data = None
    path = f"/clusters/{quote(cluster_id, safe='')}"
    return _page("cluster", f"Cluster {cluster_id[:12]}", data, path)


@pages.get("/ledger", response_class=HTMLResponse)
async def ledger_page(session: SessionDep) -> HTMLResponse:
    return _page("ledger", "Ledger", await ledger(session), "/ledger")


@pages.get("/explorer/static/{name}")
async def static(name: str) -> Response:
    found = assets.static(name)
    if found is None:
        raise NotFound("not_found", f"no explorer asset {name!r}")
    body, content_type = found
    return Response(body, media_type=content_type, headers={"Cache-Control": "max-age=300"})


@pages.get("/favicon.ico")
async def favicon() -> Response:
    found = assets.static("logo.svg")
    assert found is not None
    return Response(found[0], media_type=found[1], headers={"Cache-Control": "max-age=86400"})


# --------------------------------------------------------------------------- JSON


@router.get("/overview")
async def overview(request: Request, session: SessionDep) -> Json:
    rate = _explorer(request).rate.rate()
    return await service.overview(session, heartbeats_per_s=rate, now=time.time())


@router.get("/utilization")
async def utilization(
    request: Request, session: SessionDep, hours: float = Query(default=24.0, gt=0, le=168)
) -> Json:
    now = time.time()
    history = _explorer(request).rate.history
    step = max(1, len(history) // 150)
    return {
        "now": await service.utilization_now(session),
        "samples": await service.utilization_history(session, since=now - hours * 3600),
        "heartbeats": [[round(t, 1), round(r, 2)] for t, r in list(history)[::step]],
        "at": now,
    }


@router.get("/nodes")
async def nodes(session: SessionDep, state: StateDep) -> list[Json]:
    return await service.nodes_list(
        session, now=time.time(), heartbeat_interval_s=state.settings.heartbeat_interval_s
    )


@router.get("/nodes/{node_id}")
async def node(node_id: str, session: SessionDep, state: StateDep) -> Json:
    return await service.node_detail(
        session, node_id, now=time.time(), heartbeat_interval_s=state.settings.heartbeat_interval_s
    )


@router.get("/clusters")
async def clusters(session: SessionDep) -> list[Json]:
    return await service.clusters_list(session, now=time.time())


@router.get("/clusters/{cluster_id}")
async def cluster(cluster_id: str, session: SessionDep) -> Json:
    return await service.cluster_detail(session, cluster_id, now=time.time())


@router.get("/ledger")
async def ledger(session: SessionDep) -> Json:
    return await explorer_ledger.summary(session)


@router.get("/ledger/verify")
async def ledger_verify(request: Request, session: SessionDep) -> Json:
    return await _explorer(request).verify.verify(session)


# --------------------------------------------------------------------------- wiring


def install(app: FastAPI) -> None:
    """Add the explorer's pages, JSON, `/metrics` and the metrics middleware to `app`."""
    explorer = explorer_loops.ExplorerState()
    app.state.explorer = explorer
    app.include_router(pages)
    app.include_router(router)
    app.include_router(metrics_api.router)
    app.add_middleware(MetricsMiddleware, metrics=explorer.metrics)


def start(app: FastAPI) -> None:
    """Start the explorer's loops (from the app's lifespan)."""
    explorer_loops.spawn(app.state.loom, app.state.explorer)
