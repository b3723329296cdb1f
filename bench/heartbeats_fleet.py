"""The fake-agent fleet of bench/heartbeats.py: signed handshakes, beats, round trips.

Each simulated agent has its own Ed25519 node key and does the full handshake of
`loom worker start` (hello → auth with nonce signature, owner binding and a tiny inventory
→ welcome) over a real WebSocket, with the agent's settings (no permessage-deflate,
ping_interval=20). `Beater` then sends heartbeats round-robin at an aggregate rate;
`receive` times each HeartbeatAck(seq) against its send.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from loom.protocol.identity import KeyPair, agent_auth_message
from loom.protocol.messages import MAX_FRAME_BYTES, Auth, Inventory
from loom.protocol.version import PROTOCOL_VERSION

INVENTORY = Inventory(cpu_model="bench cpu", cpu_cores=2, ram_mb=4096, disk_free_mb=10_000)
BEAT = '{{"type":"heartbeat","seq":{seq},"load":{{"cpu_percent":12.5,"mem_used_mb":2048,"gpu_util_percent":[]}}}}'  # noqa: E501


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(eq=False)
class Agent:
    node: KeyPair
    owner: KeyPair
    binding_sig: str
    ws: ClientConnection | None = None
    seq: int = 0
    sent: dict[int, float] = field(default_factory=dict)


@dataclass
class Stats:
    window: tuple[float, float] = (float("inf"), float("inf"))
    acks_total: int = 0
    acks_in_window: int = 0
    sent_in_window: int = 0
    rtts_ms: list[float] = field(default_factory=list)
    handshake_ms: list[float] = field(default_factory=list)
    closed: collections.Counter[str] = field(default_factory=collections.Counter)
    tick_lag_ms: list[float] = field(default_factory=list)
    early_commands: int = 0


def ack(command: dict[str, Any]) -> str:
    """member.sync succeeds (nothing runs here); anything else, e.g. a hardware challenge,
    is refused as an agent without a prover would."""
    if command.get("name") == "member.sync":
        return json.dumps({"type": "ack", "id": command["id"], "ok": True, "result": {}})
    error = f"bench agent: {command.get('name')} not supported"
    return json.dumps({"type": "ack", "id": command["id"], "ok": False, "error": error})


async def handshake(agent: Agent, url: str, stats: Stats) -> None:
    t0 = time.perf_counter()
    ws = await connect(
        url, max_size=MAX_FRAME_BYTES, open_timeout=60, ping_interval=20, compression=None
    )
    hello = json.loads(await ws.recv())
    auth = Auth(
        protocol=PROTOCOL_VERSION,
        agent_version="bench",
        node_key=agent.node.public_hex,
        owner_key=agent.owner.public_hex,
        binding_sig=agent.binding_sig,
        nonce_sig=agent.node.sign(agent_auth_message(hello["nonce"])).hex(),
        name=f"bench-{agent.node.public_hex[:8]}",
        region="eu-west",
        country="DE",
        price="0.30",
        inventory=INVENTORY,
    )
    await ws.send(auth.model_dump_json())
    while True:
        msg = json.loads(await ws.recv())
        if msg.get("type") == "welcome":
            break
        if msg.get("type") != "command":
            raise RuntimeError(f"expected welcome, got {msg.get('type')!r}")
        # The coordinator may send a command (member.sync) before its welcome: answer it.
        stats.early_commands += 1
        await ws.send(ack(msg))
    stats.handshake_ms.append((time.perf_counter() - t0) * 1000)
    agent.ws = ws


async def receive(agent: Agent, stats: Stats) -> None:
    assert agent.ws is not None
    clock = time.perf_counter
    try:
        async for raw in agent.ws:
            now = clock()
            msg = json.loads(raw)
            if msg.get("type") != "heartbeat_ack":
                if msg.get("type") == "command":  # member.sync on connect: say done
                    await agent.ws.send(ack(msg))
                continue
            sent = agent.sent.pop(msg["seq"], None)
            stats.acks_total += 1
            start, end = stats.window
            if start <= now < end:
                stats.acks_in_window += 1
            if sent is not None and start <= sent < end:
                stats.rtts_ms.append((now - sent) * 1000)
    except ConnectionClosed as exc:
        stats.closed[f"{exc.rcvd.code if exc.rcvd else 1006}"] += 1
    else:
        stats.closed[f"{agent.ws.close_code}"] += 1


class Beater:
    """Sends heartbeats round-robin over the connected agents at `rate` beats/s in total."""

    TICK_S = 0.002

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.agents: list[Agent] = []
        self.per_agent_interval_s = 5.0
        self.running = True
        self._next = 0

    async def run(self) -> None:
        clock = time.perf_counter
        stats = self.stats
        last = clock()
        credit = 0.0
        while self.running:
            await asyncio.sleep(self.TICK_S)
            now = clock()
            stats.tick_lag_ms.append((now - last - self.TICK_S) * 1000)
            if len(stats.tick_lag_ms) > 200_000:
                del stats.tick_lag_ms[:100_000]
            rate = len(self.agents) / self.per_agent_interval_s
            credit += rate * (now - last)
            last = now
            due = int(credit)
            credit -= due
            start, end = stats.window
            for _ in range(min(due, len(self.agents))):
                agent = self.agents[self._next % len(self.agents)]
                self._next += 1
                if agent.ws is None:
                    continue
                agent.seq += 1
                t = clock()
                agent.sent[agent.seq] = t
                if start <= t < end:
                    stats.sent_in_window += 1
                try:
                    await agent.ws.send(BEAT.format(seq=agent.seq))
                except ConnectionClosed:
                    agent.ws = None
