"""One replica's part in a replicated coordinator: its bus, command router and sessions.

Built by the app factory when ``Settings.bus_url`` is set. Besides starting the NATS
parts, it keeps the hub's picture of the *other* replicas' agents (``hub.remote``, what
placement calls connected together with this replica's own sockets) and fences this
replica's own sockets:

- a ``NodePresence(connected=True)`` from another replica for an agent this replica
  still has a socket for means the agent reconnected there: if the database agrees (the
  session moved), the old socket is closed with CLOSE_REPLACED;
- every :data:`SYNC_S` seconds (and after a bus reconnect) the same is checked for all
  local sockets against ``agent_sessions``, and ``hub.remote`` is rebuilt from the
  sessions other replicas refreshed within the heartbeat timeout (repairs lost events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loom.coordinator.bus import Event
from loom.coordinator.hub import AgentHub
from loom.coordinator.replicas import sessions
from loom.coordinator.replicas.bus import NatsBus
from loom.coordinator.replicas.link import NatsLink
from loom.coordinator.replicas.router import CommandResponder, RoutedAgentClient
from loom.coordinator.replicas.tunnel_bus import TunnelBus
from loom.protocol.events import NodePresence
from loom.protocol.messages import CLOSE_REPLACED

log = logging.getLogger(__name__)

SYNC_S = 5.0


class Replica:
    def __init__(
        self,
        *,
        bus_url: str,
        replica_id: str,
        hub: AgentHub,
        sessions_factory: async_sessionmaker[AsyncSession],
        heartbeat_timeout_s: float,
        bus_creds: str | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.hub = hub
        self.sessions_factory = sessions_factory
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # bus_creds None: the link reads $LOOM_BUS_CREDS (what `serve --bus-creds` sets).
        self.link = NatsLink(bus_url, replica_id, bus_creds)
        self.bus = NatsBus(self.link)
        self.responder = CommandResponder(self.link, hub)
        self.agents = RoutedAgentClient(hub, self.link, self._session)
        self.tunnels = TunnelBus(self.link)
        #: Called with a node id when its agent reconnected to another replica.
        self.on_moved: list[Callable[[str], None]] = []
        self.replaced = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Called before the event reaches the placement index: remote presence is known
        # when it re-lists the node.
        self.bus.on_remote.append(self._on_event)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions_factory() as session:
            yield session

    async def start(self, on_reconnect: Callable[[], Awaitable[None]] | None = None) -> None:
        await self.link.start()
        await self.bus.start()
        await self.responder.start()
        await self.tunnels.start()
        # The server has our subscriptions before anyone is told we are here.
        await self.link.nc.flush(timeout=5)
        self.link.on_reconnect.append(self.sync)
        if on_reconnect is not None:
            self.link.on_reconnect.append(on_reconnect)
        await self.sync()

    async def close(self) -> None:
        await self.responder.close()
        await self.tunnels.close()
        await self.bus.close()
        await self.link.close()

    # -- presence and fencing ---------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if not isinstance(event, NodePresence):
            return
        node_id = event.node_id
        if not event.connected:
            self.hub.remote.pop(node_id, None)
            return
        for moved in self.on_moved:
            moved(node_id)
        if node_id in self.hub.connections:
            conn = self.hub.connections[node_id]
            # Another replica says it holds an agent we hold: it moved, or that replica
            # is behind: the database decides (in the background).
            task = asyncio.create_task(self._check_one(node_id, conn.epoch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self.hub.remote.setdefault(node_id, "")

    async def _check_one(self, node_id: str, epoch: int) -> None:
        async with self._session() as session:
            stale = await sessions.stale_among(session, self.replica_id, {node_id: epoch})
        if stale:
            await self._replace(stale)

    async def _replace(self, stale: set[str]) -> None:
        for node_id in stale:
            conn = self.hub.connections.get(node_id)
            if conn is None:
                continue
            self.replaced += 1
            self.hub.detach(conn)
            self.hub.remote.setdefault(node_id, "")
            log.info("node %s reconnected to another replica: closing our socket", node_id)
            with contextlib.suppress(Exception):
                await conn.ws.close(code=CLOSE_REPLACED, reason="held by another replica")

    async def sync(self, now: float | None = None) -> None:
        """Fence this replica's sockets and rebuild ``hub.remote`` from the sessions."""
        now = time.time() if now is None else now
        mine = {n: c.epoch for n, c in self.hub.connections.items()}
        table = sessions.TABLE
        async with self._session() as session:
            stale = await sessions.stale_among(session, self.replica_id, mine)
            rows = await session.execute(
                select(table.c.node_id, table.c.replica_id).where(
                    table.c.replica_id != self.replica_id,
                    table.c.last_seen >= now - self.heartbeat_timeout_s,
                )
            )
            remote = {node_id: replica for node_id, replica in rows}
        if stale:
            await self._replace(stale)
        before = set(self.hub.remote)
        self.hub.remote.clear()
        self.hub.remote.update({n: r for n, r in remote.items() if n not in self.hub.connections})
        # The placement index re-lists nodes whose presence changed.
        for node_id in before.symmetric_difference(self.hub.remote):
            self.bus.deliver(NodePresence(node_id=node_id, connected=node_id in self.hub.remote))
