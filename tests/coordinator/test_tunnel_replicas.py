"""The tunnel across replicas (issue 11 §3) on a real nats-server: the user's stream opens
on replica A, the head's agent socket is held by replica B.

The agent side is the real ``loom.agent.tunnel.AgentTunnel`` dialling a real TCP server
(the "head port"); between them B's hub and link, NATS, and A's relay stream. Bytes go
both ways in order, EOF closes cleanly, and B's agent socket closing ends A's stream.
Skipped, with the reason, when no NATS server answers on 127.0.0.1:4222.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from loom.agent.tunnel import AgentTunnel
from loom.coordinator import tunnel, tunnel_remote
from loom.coordinator.config import Settings
from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.replicas import sessions
from loom.coordinator.replicas.replica import Replica
from loom.coordinator.state import CoordinatorState
from loom.protocol.tunnel import data_frame, eof_frame
from support.nats import NATS_URL, needs_nats

pytestmark = needs_nats


class AgentSocket:
    """B's side of the agent's WebSocket, wired straight to the agent's tunnel code."""

    def __init__(self) -> None:
        self.agent: AgentTunnel | None = None
        self.closed = False

    async def send_bytes(self, data: bytes) -> None:
        assert self.agent is not None
        await self.agent.on_frame(data)

    async def send_text(self, data: str) -> None:
        pass

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = True


@pytest.fixture
async def pair(db_url: str) -> AsyncIterator[tuple[CoordinatorState, CoordinatorState]]:
    engine = create_engine(db_url)
    await migrate(engine)
    suffix = str(time.monotonic_ns())
    states: list[CoordinatorState] = []
    replicas: list[Replica] = []
    for name in ("a", "b"):
        settings = Settings(db_url=db_url, bus_url=NATS_URL, replica_id=f"{name}-{suffix}")
        state = CoordinatorState(settings=settings, engine=engine, sessions=session_factory(engine))
        replica = Replica(
            bus_url=NATS_URL, replica_id=settings.replica_id, hub=state.hub,
            sessions_factory=state.sessions, heartbeat_timeout_s=15.0,
        )  # fmt: skip
        await replica.start()
        tunnel_remote.install(state, replica)
        states.append(state)
        replicas.append(replica)
    try:
        yield states[0], states[1]
    finally:
        for replica in replicas:
            await replica.close()
        await engine.dispose()


async def test_a_stream_through_another_replica(
    pair: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = pair

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # The head's agent is on B.
    async with b.session() as s:
        epoch = await sessions.claim(s, "n1", b.settings.replica_id, time.time())
        await s.commit()
    sock = AgentSocket()
    conn = await b.hub.attach("n1", sock, time.time(), epoch)
    agent_link = tunnel.link_for(conn)
    sock.agent = AgentTunnel(agent_link.on_frame, lambda: {("127.0.0.1", port)})
    try:
        stream = await tunnel.open_stream(a, tunnel.Target("n1", "127.0.0.1", port))
        assert agent_link.forwarded  # B carries it for A
        payload = b"hello across replicas " * 2000  # more than one frame, under one window
        sent = 0
        while sent < len(payload):
            n = await stream.send_window.take(min(len(payload) - sent, 16384))
            await stream.link.send(data_frame(stream.id, payload[sent : sent + n]))
            sent += n
        await stream.link.send(eof_frame(stream.id))
        got = b""
        async with asyncio.timeout(20):
            while len(got) < len(payload):
                item = await stream.inbox.get()
                assert isinstance(item, bytes), item
                got += item
                stream.recv_window.release(len(item))
        assert got == payload.upper()

        # A second stream, then B loses the agent's socket: A's stream ends with a reason.
        second = await tunnel.open_stream(a, tunnel.Target("n1", "127.0.0.1", port))
        tunnel.connection_closed(conn)
        async with asyncio.timeout(10):
            while True:
                item = await second.inbox.get()
                if not isinstance(item, bytes):
                    break
        assert second.closed
    finally:
        server.close()
        await server.wait_closed()


async def test_a_refused_open_maps_to_the_tunnel_errors(
    pair: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = pair
    async with b.session() as s:  # B holds the session but has no socket for it
        await sessions.claim(s, "n2", b.settings.replica_id, time.time())
        await s.commit()
    with pytest.raises(tunnel.Unavailable):
        await tunnel.open_stream(a, tunnel.Target("n2", "127.0.0.1", 1))
    with pytest.raises(tunnel.Unavailable):  # nobody holds n3
        await tunnel.open_stream(a, tunnel.Target("n3", "127.0.0.1", 1))
