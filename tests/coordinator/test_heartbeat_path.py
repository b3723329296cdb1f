"""The heartbeat fast path: the agent's own spelling is validated from the text in one pass,
acked, and its load reaches the database at flush; a malformed beat still closes with why."""

from __future__ import annotations

import asyncio
import json
import time

from sqlalchemy import select

from loom.coordinator.db.models import Node
from loom.protocol.identity import KeyPair, node_id_for
from loom.protocol.messages import CLOSE_BAD_MESSAGE, Heartbeat, Load
from support.rawagent import auth_message, open_raw
from support.servers import CoordinatorThread


async def _joined(coordinator: CoordinatorThread) -> tuple[object, str]:
    node, owner = KeyPair.generate(), KeyPair.generate()
    ws, hello = await open_raw(coordinator.url)
    await ws.send(json.dumps(auth_message(hello["nonce"], node, owner)))
    assert json.loads(await ws.recv())["type"] == "welcome"
    return ws, node_id_for(node.public_hex)


async def _ack(ws: object) -> dict[str, object]:
    """The next heartbeat ack, past commands the coordinator sends on connect (member.sync)."""
    while True:
        frame = json.loads(await ws.recv())  # type: ignore[attr-defined]
        if frame["type"] != "command":
            return dict(frame)


async def test_agent_spelled_beats_are_acked_and_flushed(coordinator: CoordinatorThread) -> None:
    ws, node_id = await _joined(coordinator)
    load = Load(cpu_percent=42.5, mem_used_mb=1234, gpu_util_percent=[7.0])
    for seq in (1, 2, 3):
        frame = Heartbeat(seq=seq, load=load).model_dump_json()
        assert frame.startswith('{"type":"heartbeat",')  # what every agent sends
        await ws.send(frame)  # type: ignore[attr-defined]
        assert await _ack(ws) == {"type": "heartbeat_ack", "seq": seq}
    # The general spelling (spaces, extra fields) still works.
    await ws.send(json.dumps({"type": "heartbeat", "seq": 4, "later_field": True}))  # type: ignore[attr-defined]
    assert await _ack(ws) == {"type": "heartbeat_ack", "seq": 4}
    state = coordinator.app.state.loom

    async def read() -> tuple[int, str]:
        async with state.session() as session:
            row = (await session.execute(select(Node).where(Node.id == node_id))).scalar_one()
            return row.heartbeats, row.load_json

    deadline = time.monotonic() + 20
    while True:
        beats, load_json = coordinator.run_coro(read())
        if beats >= 4 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert beats >= 4
    assert json.loads(load_json) == Load().model_dump(mode="json")  # the newest beat's load
    await ws.close()  # type: ignore[attr-defined]


async def test_a_malformed_fast_path_beat_closes_with_the_reason(
    coordinator: CoordinatorThread,
) -> None:
    ws, _node_id = await _joined(coordinator)
    await ws.send('{"type":"heartbeat","seq":"soon"}')  # type: ignore[attr-defined]
    closed = None
    try:
        while True:
            await ws.recv()  # type: ignore[attr-defined]
    except Exception as exc:  # ConnectionClosed
        closed = getattr(exc, "rcvd", None)
    assert closed is not None and closed.code == CLOSE_BAD_MESSAGE
    assert "seq" in closed.reason


async def test_acks_and_commands_sent_at_once_arrive_whole(
    coordinator: CoordinatorThread,
) -> None:
    """Acks skip the connection's send lock: commands sent meanwhile by other tasks still
    arrive as whole frames, every one of each."""
    ws, node_id = await _joined(coordinator)
    conn = coordinator.state.hub.get(node_id)
    n = 300

    async def commands() -> None:
        for i in range(n):
            await conn.post("bench.noop", json.dumps({"i": i}))
            await asyncio.sleep(0)

    posting = asyncio.run_coroutine_threadsafe(commands(), coordinator.loop)  # type: ignore[arg-type]
    for seq in range(1, n + 1):
        await ws.send(Heartbeat(seq=seq).model_dump_json())  # type: ignore[attr-defined]
    acks: list[int] = []
    noops: list[int] = []
    while len(acks) < n or len(noops) < n:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 20))  # type: ignore[attr-defined]
        if frame["type"] == "heartbeat_ack":
            acks.append(frame["seq"])
        elif frame["type"] == "command" and frame["name"] == "bench.noop":
            noops.append(frame["args"]["i"])
    posting.result(20)
    assert acks == list(range(1, n + 1))
    assert noops == list(range(n))
    await ws.close()  # type: ignore[attr-defined]
