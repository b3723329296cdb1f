"""Per-cluster secrets (issue 14 §3): a supplier sees what its member needs, no more.

Two recording agents, A and B, each serving one cluster. Everything the coordinator ever
sends A (every command, every ack of a heartbeat, member.sync after a reconnect) is kept;
none of it holds B's Ray token, and the other way round. A's operator, through every
route it can reach (signed routes with its owner key, the tunnel, every public route),
gets neither B's token nor B's cluster; A's agent cannot speak for B's member (a forged
``member.lost``) nor vouch for it, and cannot open tunnel streams at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.db.models import Member
from loom.protocol.identity import KeyPair, node_id_for
from loom.protocol.tunnel import open_frame
from support.fakeagent import force_available
from support.rawagent import auth_message, ws_url
from support.servers import CoordinatorThread, wait_for


@dataclass
class Recorder:
    name: str
    price: str
    node: KeyPair = field(default_factory=KeyPair.generate)
    owner: KeyPair = field(default_factory=KeyPair.generate)
    received: list[str] = field(default_factory=list)
    ws: ClientConnection | None = None
    welcomed: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def node_id(self) -> str:
        return node_id_for(self.node.public_hex)

    async def run(self, url: str, stop: asyncio.Event) -> None:
        self.loop = asyncio.get_running_loop()
        async with connect(ws_url(url)) as ws:
            self.ws = ws
            hello = json.loads(await ws.recv())
            auth = auth_message(
                hello["nonce"], self.node, self.owner, name=self.name, price=self.price
            )
            await ws.send(json.dumps(auth))
            self.received.append(str(await ws.recv()))
            self.welcomed.set()
            seq, last = 0, 0.0
            while not stop.is_set():
                if time.monotonic() - last > 1:
                    seq += 1
                    await ws.send(json.dumps({"type": "heartbeat", "seq": seq}))
                    last = time.monotonic()
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.3)
                except TimeoutError:
                    continue
                self.received.append(raw if isinstance(raw, str) else raw.hex())
                msg = json.loads(raw)
                if msg.get("type") == "command" and not msg["name"].startswith("challenge."):
                    result: dict[str, Any] = {}
                    if msg["name"] == "member.start":
                        result = {"gcs_address": "127.0.0.2:1", "ray_node_id": self.name * 8}
                    await ws.send(
                        json.dumps({"type": "ack", "id": msg["id"], "ok": True, "result": result})
                    )


@pytest.fixture
def recorders(coordinator: CoordinatorThread) -> Iterator[tuple[Recorder, Recorder]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stop = asyncio.Event()
    pair = (Recorder("a", "0.1"), Recorder("b", "0.2"))
    futures = [asyncio.run_coroutine_threadsafe(r.run(coordinator.url, stop), loop) for r in pair]
    try:
        for r in pair:
            assert r.welcomed.wait(15), f"agent {r.name} not welcomed"
        yield pair
    finally:
        loop.call_soon_threadsafe(stop.set)
        for f in futures:
            with contextlib.suppress(Exception):  # the tunnel probe closes A on purpose
                f.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_an_agent_serving_a_never_obtains_b_s_token(
    coordinator: CoordinatorThread, client: LoomClient, recorders: tuple[Recorder, Recorder]
) -> None:
    a, b = recorders
    coordinator.run_coro(force_available(coordinator.state.sessions, [a.node_id, b.node_id]))
    client.deposit("100")
    # A is cheaper: cluster "ca" takes both of its cores, so "cb" lands on B.
    client.create_cluster({"name": "ca", "resources": {"cpus": 2}, "duration": "1h"})
    ca = client.wait_cluster("ca", timeout=20)
    client.create_cluster({"name": "cb", "resources": {"cpus": 2}, "duration": "1h"})
    cb = client.wait_cluster("cb", timeout=20)
    assert ca.state == cb.state == "running"
    assert [m.node_id for m in ca.members] == [a.node_id]
    assert [m.node_id for m in cb.members] == [b.node_id]
    wait_for(lambda: any(cb.ray_token in m for m in b.received), 10, "B got its token")
    assert any(ca.ray_token in m for m in a.received)

    # A's operator, with its own key, through every route it can reach.
    with LoomClient(coordinator.url, a.owner) as op:
        assert op.clusters(all_states=True) == []
        for ref in (cb.id, cb.name):
            with pytest.raises(LoomAPIError) as info:
                op.cluster(ref)
            assert info.value.status == 404
        with pytest.raises(LoomAPIError) as info:
            op.request("GET", f"/v1/clusters/{cb.id}/tunnel", params={"port": "dashboard"})
        assert info.value.status in (400, 404, 426)
        for path in ("/v1/nodes", f"/v1/nodes/{b.node_id}", "/v1/me", "/v1/earnings"):
            text = op.request("GET", path).text
            assert cb.ray_token not in text and ca.ray_token not in text, path
    with httpx.Client(base_url=coordinator.url, timeout=30) as anon:
        paths = [p for p, ops in coordinator.app.openapi()["paths"].items() if "get" in ops]
        for path in [*paths, "/", "/clusters", f"/clusters/{cb.id}", "/ledger", "/metrics"]:
            path = path.replace("{cluster_id}", cb.id).replace("{node_id}", b.node_id)
            text = anon.get(path.replace("{ref}", cb.id)).text
            assert cb.ray_token not in text and ca.ray_token not in text, path

    # A's agent cannot speak for B's member, nor vouch for it.
    member_b = cb.members[0].id
    forged = [
        {"type": "report", "kind": "member.lost", "data": {"member_id": member_b}},
        {"type": "report", "kind": "member.seen", "data": {"member_id": member_b}},
    ]
    for msg in forged:
        _send(a, json.dumps(msg))
    time.sleep(1.0)
    after = client.cluster(cb.id)
    assert after.state == "running" and after.members[0].state == "ready"
    confirmed = coordinator.run_coro(_confirmed_s(coordinator, member_b))
    assert confirmed == 0.0

    # Everything the coordinator ever sent A holds no token but its own cluster's.
    assert not any(cb.ray_token in m for m in a.received)
    assert not any(ca.ray_token in m for m in b.received)

    # Agents never open tunnel streams: trying it ends A's connection.
    _send(a, open_frame(1, "127.0.0.1", 6379))
    wait_for(lambda: a.node_id not in coordinator.state.hub.connections, 10, "A dropped")
    assert not any(cb.ray_token in m for m in a.received)


def _send(agent: Recorder, data: str | bytes) -> None:
    """Send one frame from the agent's own loop (as a tampered agent would)."""
    assert agent.ws is not None and agent.loop is not None
    asyncio.run_coroutine_threadsafe(agent.ws.send(data), agent.loop).result(10)


async def _confirmed_s(coordinator: CoordinatorThread, member_id: str) -> float:
    async with coordinator.state.session() as session:
        member = await session.get(Member, member_id)
        assert member is not None
        return float(member.confirmed_s)
