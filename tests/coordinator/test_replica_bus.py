"""The NATS parts of coordinator replicas on a real nats-server (issue 11 §3).

Two replicas in one process, each with its own NATS connection: change events cross, a
command for an agent held by the other replica travels as a request and comes back as
the agent's ack, and the failure cases map onto the hub's errors. Skipped, with the
reason, when no NATS server answers on 127.0.0.1:4222.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.hub import AgentHub, AgentNotConnected, CommandFailed
from loom.coordinator.replicas import sessions
from loom.coordinator.replicas.replica import Replica
from loom.protocol.events import ChangeCause, NodeChanged, NodePresence
from loom.protocol.messages import Ack
from support.nats import NATS_URL, needs_nats

pytestmark = needs_nats


class EchoAgent:
    """Stands in for an agent's socket: acknowledges every command it is sent."""

    def __init__(self, hub: AgentHub, node_id: str) -> None:
        self.hub = hub
        self.node_id = node_id
        self.commands: list[dict[str, object]] = []
        self.closed: int | None = None

    async def send_text(self, data: str) -> None:
        frame = json.loads(data)
        self.commands.append(frame)
        if frame.get("name") == "slow":
            return  # never answers
        ack = Ack(id=frame["id"], ok=True, result={"echo": frame.get("args")})
        asyncio.get_running_loop().call_soon(self.hub.get(self.node_id).resolve, ack)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = code


async def _until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def replicas(db_url: str) -> AsyncIterator[tuple[Replica, Replica, async_sessionmaker]]:  # type: ignore[type-arg]
    engine = create_engine(db_url)
    await migrate(engine)
    make = session_factory(engine)
    suffix = str(time.monotonic_ns())
    built = [
        Replica(bus_url=NATS_URL, replica_id=f"{name}-{suffix}", hub=AgentHub(),
                sessions_factory=make, heartbeat_timeout_s=15.0)
        for name in ("a", "b")
    ]  # fmt: skip
    for replica in built:
        await replica.start()
    try:
        yield built[0], built[1], make
    finally:
        for replica in built:
            await replica.close()
        await engine.dispose()


async def test_events_cross_replicas(replicas: tuple[Replica, Replica, object]) -> None:
    a, b, _ = replicas
    heard: list[object] = []
    b.bus.subscribe(heard.append)
    event = NodeChanged(node_id="n1", cause=ChangeCause.ALLOCATION)
    a.bus.publish(event)
    await _until(lambda: event in heard)
    assert b.bus.received >= 1
    # Presence from another replica: b now counts n2 as connected (placement sees it).
    a.bus.publish(NodePresence(node_id="n2", connected=True))
    await _until(lambda: "n2" in b.hub.present)
    a.bus.publish(NodePresence(node_id="n2", connected=False))
    await _until(lambda: "n2" not in b.hub.present)


async def test_a_command_reaches_the_agent_through_its_replica(
    replicas: tuple[Replica, Replica, async_sessionmaker],  # type: ignore[type-arg]
) -> None:
    a, b, make = replicas
    async with make() as s:
        epoch = await sessions.claim(s, "n1", b.replica_id, time.time())
        await s.commit()
    agent = EchoAgent(b.hub, "n1")
    await b.hub.attach("n1", agent, time.time(), epoch)
    ack = await a.agents._send("n1", "member.sync", '{"x": 1}', 5.0)
    assert ack.ok and ack.result == {"echo": {"x": 1}}
    assert a.agents.routed == 1 and b.responder.served == 1
    await a.agents._post("n1", "member.seen", "{}")
    await _until(lambda: len(agent.commands) == 2)
    with pytest.raises(CommandFailed, match="no answer"):
        await a.agents._send("n1", "slow", "{}", 0.2)


async def test_routing_failures_map_onto_the_hubs_errors(
    replicas: tuple[Replica, Replica, async_sessionmaker],  # type: ignore[type-arg]
) -> None:
    a, b, make = replicas
    with pytest.raises(AgentNotConnected):  # no session at all
        await a.agents._send("nobody", "member.sync", "{}", 1.0)
    async with make() as s:
        await sessions.claim(s, "n2", b.replica_id, time.time())
        await sessions.claim(s, "n3", "dead-replica", time.time())
        await s.commit()
    with pytest.raises(AgentNotConnected):  # b holds the session but has no socket
        await a.agents._send("n2", "member.sync", "{}", 1.0)
    with pytest.raises(AgentNotConnected, match="gone"):  # nobody serves that replica
        await a.agents._send("n3", "member.sync", "{}", 1.0)


async def test_a_replaced_socket_is_closed_when_the_session_moves(
    replicas: tuple[Replica, Replica, async_sessionmaker],  # type: ignore[type-arg]
) -> None:
    a, b, make = replicas
    async with make() as s:
        e1 = await sessions.claim(s, "n4", a.replica_id, time.time())
        await s.commit()
    old = EchoAgent(a.hub, "n4")
    await a.hub.attach("n4", old, time.time(), e1)
    async with make() as s:  # the agent reconnected to b
        e2 = await sessions.claim(s, "n4", b.replica_id, time.time())
        await s.commit()
    await b.hub.attach("n4", EchoAgent(b.hub, "n4"), time.time(), e2)
    b.bus.publish(NodePresence(node_id="n4", connected=True))
    await _until(lambda: old.closed is not None)
    assert "n4" not in a.hub.connections and "n4" in a.hub.present
    assert a.replaced == 1


async def test_frames_back_before_the_open_reply_wait_for_the_stream(
    replicas: tuple[Replica, Replica, async_sessionmaker],  # type: ignore[type-arg]
) -> None:
    """The holder's agent answers OPENED before the open's reply reaches the user's
    replica (another subject, another subscription task): the frame is held until the
    opener has its stream id, never dropped as a frame for an unknown stream."""
    a, b, _ = replicas
    registered: set[int] = set()
    heard: list[tuple[bytes, bool]] = []

    async def serve_open(node_id: str, host: str, port: int, origin: str) -> int:
        await b.tunnels.back(origin, node_id, b"opened-7")  # before the reply, on purpose
        await b.link.nc.flush()
        await asyncio.sleep(0.05)  # the frame is at A before the reply is even sent
        return 7

    async def on_back(node_id: str, _origin: str, frame: bytes) -> None:
        heard.append((frame, 7 in registered))

    b.tunnels.on_open = serve_open
    a.tunnels.on_back = on_back
    stream = await a.tunnels.open(b.replica_id, "n9", "127.0.0.1", 1, timeout=5)
    registered.add(stream)  # what RemoteLink.open does as soon as open returns
    await _until(lambda: heard)
    await b.tunnels.back(a.replica_id, "n9", b"data-7")
    await _until(lambda: len(heard) == 2)
    assert heard == [(b"opened-7", True), (b"data-7", True)]
