"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loom.coordinator import tunnel_remote
from loom.coordinator.api import agent_ws, clusters, errors, money, nodes, public, verification
from loom.coordinator.api import docs as docs_api
from loom.coordinator.api import explorer as explorer_api
from loom.coordinator.api import tunnel as tunnel_api
from loom.coordinator.api.limits import BodyLimitMiddleware
from loom.coordinator.bus import BUS_KEY, EventBus
from loom.coordinator.challenger import Challenger
from loom.coordinator.config import Settings
from loom.coordinator.confirmation import confirm_step
from loom.coordinator.connects import ConnectBatch
from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.loops import cluster_events
from loom.coordinator.loops import clusters as cluster_loop
from loom.coordinator.loops.challenger import challenger_loop
from loom.coordinator.loops.settlement import settlement_step
from loom.coordinator.loops.watchdog import flush_heartbeats, watchdog_step
from loom.coordinator.overlay import api as overlay_api
from loom.coordinator.overlay import service as overlay_service
from loom.coordinator.placement_index import REFRESH_S as PLACEMENT_REFRESH_S
from loom.coordinator.placement_index import RESYNC_S as PLACEMENT_RESYNC_S
from loom.coordinator.placement_index import PlacementIndex
from loom.coordinator.replicas.replica import SYNC_S as REPLICA_SYNC_S
from loom.coordinator.replicas.replica import Replica
from loom.coordinator.services.confirmation import CONFIRM_INTERVAL_S
from loom.coordinator.services.ledger_queue import sequencer_for
from loom.coordinator.state import CoordinatorState
from loom.protocol.events import NodePresence
from loom.protocol.messages import Report

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    engine = create_engine(settings.db_url)
    state = CoordinatorState(settings=settings, engine=engine, sessions=session_factory(engine))
    # Deposits are sealed in batches by the ledger's one sequencer (a leased role with
    # replicas; others hand their transfers over through the ledger_queue table).
    ledger_seq = sequencer_for(
        state.sessions, replicated=bool(settings.bus_url), owner=settings.replica_id
    )
    state.ledger = ledger_seq
    # Change events (loom.protocol.events) from every session to the placement index.
    # With replicas (``--bus``) the events travel over NATS and commands are routed to
    # the replica holding the agent's socket (loom.coordinator.replicas).
    replica = (
        Replica(
            bus_url=settings.bus_url,
            replica_id=settings.replica_id,
            hub=state.hub,
            sessions_factory=state.sessions,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
        )
        if settings.bus_url
        else None
    )
    bus = replica.bus if replica is not None else EventBus()
    if replica is not None:
        state.agents = replica.agents
        tunnel_remote.install(state, replica)  # tunnels to heads held by other replicas
    state.sessions.configure(info={BUS_KEY: bus})
    placement = PlacementIndex(
        state.sessions, require_verified=settings.require_verified, presence=state.hub.present
    )
    placement.attach(bus)
    state.placement = placement

    challenger = Challenger(state)
    # Connect work in batches (loom.coordinator.connects): the handshake awaits its node's
    # activation (`verifying`/`available`); the challenger's first challenges and the
    # agent's member.sync follow, prepared for every node of the batch at once.
    connects = ConnectBatch(state, challenger)

    async def on_connect(node_id: str) -> None:
        bus.publish(NodePresence(node_id=node_id, connected=True))
        await connects.on_connect(node_id)

    async def on_offline(node_id: str) -> None:
        bus.publish(NodePresence(node_id=node_id, connected=False))
        state.track(asyncio.create_task(cluster_events.on_node_offline(state, node_id)))

    async def on_member_lost(node_id: str, report: Report, _received_at: float) -> None:
        lost = cluster_events.on_report_member_lost(state, node_id, report)
        state.track(asyncio.create_task(lost))

    state.hub.on_connect.append(on_connect)
    state.hub.on_offline.append(on_offline)
    state.hub.on_report("member.lost", on_member_lost)
    challenger.install(on_connect=False)  # connects reach it through `connects`

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await migrate(engine)
        # Free what a previous process of ours left leased (rows and roles) before any
        # role is taken again: the ledger sequencer below claims its role at once.
        reconciler = cluster_loop.ClusterLoop(state)
        await reconciler.recover()
        ledger_seq.start()
        if replica is not None:
            await replica.start(on_reconnect=placement.load)
        # The placement index first (before the first request; then events and resyncs):
        # its rows are long-lived too, and frozen with the rest below.
        await placement.load()
        # Everything imported and built so far lives as long as the process: keep it out
        # of the cyclic GC's scans, and collect the young generation less often. Full
        # collections over tens of thousands of long-lived objects otherwise stall the
        # event loop for 100+ ms at random (seen as heartbeat p99 in bench/heartbeats.py).
        if settings.tune_gc:
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)
        state.started_at = time.time()

        async def watchdog() -> None:
            await watchdog_step(state)

        async def flusher() -> None:
            await flush_heartbeats(state)

        state.spawn_loop("watchdog", settings.watchdog_interval_s, watchdog)
        cluster_loop.spawn(state, reconciler, settings.reconcile_interval_s)
        state.spawn_loop("heartbeat-flush", settings.heartbeat_flush_s, flusher)
        state.spawn_loop("challenger", challenger.config.loop_s, challenger_loop(challenger))
        state.spawn_loop("settlement", settings.settle_interval_s, lambda: settlement_step(state))
        state.spawn_loop("confirmation", CONFIRM_INTERVAL_S, lambda: confirm_step(state))
        state.spawn_loop("placement-resync", PLACEMENT_RESYNC_S, placement.load)
        state.spawn_loop("placement-refresh", PLACEMENT_REFRESH_S, placement.refresh)
        if replica is not None:
            state.spawn_loop("replica-sync", REPLICA_SYNC_S, replica.sync)
        await overlay_service.install(state)  # the Nebula lighthouse, when configured
        explorer_api.start(_app)
        log.info("coordinator ready on %s:%s (db %s)", settings.host, settings.port, engine.url)
        try:
            yield
        finally:
            await state.stop_loops()
            await ledger_seq.stop()
            try:
                await flush_heartbeats(state)
            finally:
                if replica is not None:
                    await replica.close()
                await engine.dispose()

    app = FastAPI(
        title="Loom coordinator",
        version="0.1.0",
        description="Decentralized GPU cloud: verified supply, Ray clusters, per-second billing.",
        lifespan=lifespan,
        docs_url=None,  # served offline by docs_api (no CDN)
        redoc_url=None,
    )
    app.state.loom = state
    app.state.challenger = challenger
    app.state.connects = connects  # tests: `await connects.idle()`
    errors.install(app)
    app.include_router(public.router)
    app.include_router(nodes.router)
    app.include_router(clusters.router)
    app.include_router(verification.router)
    app.include_router(money.router)
    app.include_router(agent_ws.router)
    app.include_router(tunnel_api.router)
    app.include_router(overlay_api.router)
    explorer_api.install(app)  # pages at /, /explorer/api, /metrics
    docs_api.install(app)  # /docs with Swagger UI from the swagger-ui-bundle package
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app
