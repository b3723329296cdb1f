"""The tunnel across coordinator replicas: a user on this replica, the head's agent on another.

The user's side is the ordinary relay (``loom.coordinator.tunnel.relay``) over a
:class:`RemoteLink` instead of the agent's own link: its ``send`` publishes each frame to
the holder replica (``loom.coordinator.replicas.tunnel_bus``), and frames coming back are
fed to ``on_frame`` as if the agent had sent them here. The holder keeps a
:class:`~loom.coordinator.tunnel.Forward` per such stream on the agent's link and passes
frames through verbatim both ways, so the stream ids, the OPENED handshake and the credit
windows are the agent's own, end to end.

A stream ends as a local one does (EOF both ways, or CLOSE from either end). If the
agent's socket closes at the holder, the holder sends each forwarded stream a CLOSE; if
the holder itself dies (nobody sends that CLOSE), the agent reconnects elsewhere and this
replica hears it (a remote NodePresence): every stream through the old holder is aborted.
"""

from __future__ import annotations

import itertools
import logging

from loom.coordinator.replicas import sessions
from loom.coordinator.replicas.replica import Replica
from loom.coordinator.replicas.tunnel_bus import RemoteOpenRefused
from loom.coordinator.state import CoordinatorState
from loom.coordinator.tunnel import (
    OPEN_TIMEOUT_S,
    AgentLink,
    RelayStream,
    Target,
    TunnelError,
    Unavailable,
    install_remote,
    link_for,
)

log = logging.getLogger(__name__)


class RemoteLink(AgentLink):
    """The streams to one node's agent through the replica ``holder`` that holds it."""

    def __init__(self, replica: Replica, node_id: str, holder: str) -> None:
        # No local connection: the agent is on ``holder``. (AgentLink's conn is unused.)
        self.streams = {}
        self.forwarded = {}
        self._ids = itertools.count(1)
        self.lost = None
        self.replica = replica
        self.node_id = node_id
        self.holder = holder

    async def send(self, data: bytes) -> None:
        await self.replica.tunnels.to_agent(self.holder, self.node_id, data)

    async def open(self, host: str, port: int, timeout: float = OPEN_TIMEOUT_S) -> RelayStream:
        if self.lost is not None:
            raise Unavailable("head_unreachable", "the head's agent is not connected")
        try:
            stream_id = await self.replica.tunnels.open(
                self.holder, self.node_id, host, port, timeout
            )
        except RemoteOpenRefused as exc:
            if exc.code == "tunnel_timeout":
                raise TunnelError(exc.code, exc.message) from None
            raise Unavailable(exc.code, exc.message) from None
        stream = RelayStream(stream_id, self)
        self.streams[stream.id] = stream
        await self._await_open(stream, None, host, port, timeout)
        return stream


class RemoteTunnels:
    """This replica's two roles: the user's end (``open``) and the holder's (serving the
    tunnel bus's open and to-agent frames)."""

    def __init__(self, state: CoordinatorState, replica: Replica) -> None:
        self.state = state
        self.replica = replica
        self.links: dict[str, RemoteLink] = {}
        bus = replica.tunnels
        bus.on_open = self._serve_open
        bus.on_to_agent = self._serve_to_agent
        bus.on_back = self._serve_back
        replica.on_moved.append(self._node_moved)

    async def open(self, target: Target) -> RelayStream:
        async with self.state.session() as session:
            held = await sessions.holder(session, target.node_id)
        if held is None or held.replica_id == self.replica.replica_id:
            raise Unavailable(
                "head_unreachable", "the head's agent is not connected to the coordinator right now"
            )
        link = self.links.get(target.node_id)
        if link is None or link.holder != held.replica_id or link.lost is not None:
            link = self.links[target.node_id] = RemoteLink(
                self.replica, target.node_id, held.replica_id
            )
        return await link.open(target.host, target.port)

    def _node_moved(self, node_id: str) -> None:
        link = self.links.pop(node_id, None)
        if link is not None:
            link.connection_lost()

    # -- the holder's side ----------------------------------------------------------

    async def _serve_open(self, node_id: str, host: str, port: int, origin: str) -> int:
        conn = self.state.hub.connections.get(node_id)
        if conn is None:
            raise RemoteOpenRefused("head_unreachable", "the head's agent is not connected here")
        bus = self.replica.tunnels

        async def deliver(frame: bytes) -> None:
            await bus.back(origin, node_id, frame)

        try:
            return await link_for(conn).open_forward(host, port, origin, deliver)
        except Unavailable as exc:
            raise RemoteOpenRefused(exc.code, exc.message) from None

    async def _serve_to_agent(self, node_id: str, origin: str, frame: bytes) -> None:
        conn = self.state.hub.connections.get(node_id)
        if conn is not None:
            await link_for(conn).forward_in(origin, frame)

    async def _serve_back(self, node_id: str, _origin: str, frame: bytes) -> None:
        link = self.links.get(node_id)
        if link is not None:
            await link.on_frame(frame)


def install(state: CoordinatorState, replica: Replica) -> RemoteTunnels:
    tunnels = RemoteTunnels(state, replica)
    install_remote(state.hub, tunnels.open)
    return tunnels


__all__ = ["RemoteLink", "RemoteTunnels", "install"]
