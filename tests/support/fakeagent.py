"""Protocol-level fake agents: raw WebSockets that handshake, heart-beat and answer the
coordinator's commands, without Ray. They run on one event loop in a background thread
(so synchronous tests and coordinator subprocesses can use them) and reconnect when the
coordinator goes away, keeping their node keys (so they come back as the same nodes).

``member.start`` is answered by ``on_start(args)``: a dict is the ack's result, None a
negative ack. Every start's args land in ``started``, every stopped member id in
``stopped``; other commands are acked, except ``challenge.*``, which go unanswered (no
prover here): tests that need placeable nodes mark them verified (`force_available`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from websockets.asyncio.client import connect

from loom.coordinator.bus import publish_on
from loom.coordinator.db.models import Device, Node
from loom.protocol.events import ChangeCause
from loom.protocol.identity import KeyPair, node_id_for
from loom.protocol.messages import GpuInfo, Inventory
from support.rawagent import auth_message, ws_url

StartHandler = Callable[[dict[str, Any]], dict[str, Any] | None]


def default_start(_args: dict[str, Any]) -> dict[str, Any] | None:
    return {"gcs_address": "127.0.0.2:6379", "ray_node_id": "f" * 8}


@dataclass
class FakeNode:
    name: str
    node: KeyPair
    owner: KeyPair
    region: str
    price: str
    cpu_cores: int
    gpus: list[str]
    welcomed: threading.Event = field(default_factory=threading.Event)
    stop: bool = False

    @property
    def node_id(self) -> str:
        return node_id_for(self.node.public_hex)

    def inventory(self) -> Inventory:
        gpus = [
            GpuInfo(index=i, model=m, name=m, vram_mb=24576, uuid=f"{self.name}-{i}", declared=True)
            for i, m in enumerate(self.gpus)
        ]
        return Inventory(
            cpu_model="test cpu",
            cpu_cores=self.cpu_cores,
            ram_mb=4096,
            disk_free_mb=1000,
            gpus=gpus,
        )


class FakeAgents:
    def __init__(self, url: str) -> None:
        self.url = url
        self.nodes: list[FakeNode] = []
        self.started: list[dict[str, Any]] = []
        self.stopped: list[str] = []
        self.commands: list[str] = []
        #: (node id, command name, args) of every command, in arrival order.
        self.received: list[tuple[str, str, dict[str, Any]]] = []
        self.on_start: StartHandler = default_start
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._tasks: list[asyncio.Future[None]] = []

    def add(
        self,
        name: str,
        *,
        price: str = "0.25",
        region: str = "eu-west",
        cpu_cores: int = 2,
        gpus: list[str] | None = None,
        owner: KeyPair | None = None,
        timeout: float = 15.0,
    ) -> FakeNode:
        """Connect one more fake agent and wait until the coordinator welcomed it."""
        node = FakeNode(
            name,
            KeyPair.generate(),
            owner or KeyPair.generate(),
            region,
            price,
            cpu_cores,
            list(gpus or []),
        )
        self.nodes.append(node)
        self._tasks.append(asyncio.run_coroutine_threadsafe(self._run(node), self._loop))
        if not node.welcomed.wait(timeout):
            raise AssertionError(f"fake agent {name} was not welcomed within {timeout} s")
        return node

    def wait_connected(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if not node.welcomed.wait(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"fake agent {node.name} did not reconnect")

    def close(self) -> None:
        for node in self.nodes:
            node.stop = True
        for task in self._tasks:
            with contextlib.suppress(Exception):
                task.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _run(self, node: FakeNode) -> None:
        while not node.stop:
            with contextlib.suppress(Exception):
                await self._session(node)
            node.welcomed.clear()
            if not node.stop:
                await asyncio.sleep(0.2)

    async def _session(self, node: FakeNode) -> None:
        async with connect(ws_url(self.url), open_timeout=3, close_timeout=1) as ws:
            hello = json.loads(await ws.recv())
            auth = auth_message(
                hello["nonce"],
                node.node,
                node.owner,
                name=node.name,
                region=node.region,
                price=node.price,
            )
            auth["inventory"] = node.inventory().model_dump(mode="json")
            await ws.send(json.dumps(auth))
            welcome = json.loads(await ws.recv())
            if welcome.get("type") != "welcome":
                raise RuntimeError(f"refused: {welcome}")
            node.welcomed.set()
            seq = 0
            last_beat = 0.0
            while not node.stop:
                if time.monotonic() - last_beat > 1.0:
                    seq += 1
                    await ws.send(json.dumps({"type": "heartbeat", "seq": seq}))
                    last_beat = time.monotonic()
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    continue
                msg = json.loads(raw)
                if msg.get("type") == "command":
                    answer = self._answer(msg, node.node_id)
                    if answer is not None:
                        await ws.send(json.dumps(answer))

    def _answer(self, cmd: dict[str, Any], node_id: str = "") -> dict[str, Any] | None:
        name = str(cmd.get("name"))
        args = cmd.get("args") or {}
        self.commands.append(name)
        self.received.append((node_id, name, args))
        ack: dict[str, Any] = {"type": "ack", "id": cmd["id"], "ok": True, "result": {}}
        if name == "member.start":
            self.started.append(args)
            result = self.on_start(args)
            if result is None:
                ack.update(ok=False, error="the fake agent was told to fail this start")
            else:
                ack["result"] = result
        elif name == "member.stop":
            self.stopped.append(str(args.get("member_id")))
        elif name.startswith("challenge."):
            return None  # no prover here: the challenge times out (an error, not a failure)
        return ack


async def force_available(sessions: Any, node_ids: list[str]) -> None:
    """Mark the nodes' devices verified and the nodes available (tests without a prover).

    Waits first until the coordinator's connect hooks have run (they move a new node from
    `registering` to `verifying`); forcing before that would be undone by them.
    """
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        async with sessions() as session:
            states = set(
                (await session.execute(select(Node.state).where(Node.id.in_(node_ids)))).scalars()
            )
        if "registering" not in states and states:
            break
        await asyncio.sleep(0.05)
    async with sessions() as session:
        await session.execute(
            update(Device).where(Device.node_id.in_(node_ids)).values(state="verified")
        )
        await session.execute(
            update(Node)
            .where(Node.id.in_(node_ids), Node.state.in_(("registering", "verifying")))
            .values(state="available")
        )
        for node_id in node_ids:  # like every writer, tell the placement index (on commit)
            publish_on(session, node_id, ChangeCause.DEVICE_VERDICT)
        await session.commit()
