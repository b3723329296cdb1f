"""The agent WebSocket: handshake, refusals with reasons, garbage, nothing half-written."""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import ConnectionClosed

from loom.client.sdk import LoomClient
from loom.protocol.identity import KeyPair, node_id_for
from loom.protocol.messages import (
    CLOSE_AUTH_FAILED,
    CLOSE_BAD_MESSAGE,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_PROTOCOL_TOO_OLD,
)
from support.rawagent import auth_message, open_raw
from support.servers import CoordinatorThread


async def _closed_with(ws: object) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()  # type: ignore[attr-defined]
    rcvd = info.value.rcvd
    assert rcvd is not None
    return rcvd.code, rcvd.reason


async def test_handshake_registers_node_and_heartbeat_is_acked(
    coordinator: CoordinatorThread, client: LoomClient
) -> None:
    node, owner = KeyPair.generate(), KeyPair.generate()
    ws, hello = await open_raw(coordinator.url)
    assert hello["type"] == "hello" and len(hello["nonce"]) == 64
    await ws.send(json.dumps(auth_message(hello["nonce"], node, owner)))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    assert welcome["node_id"] == node_id_for(node.public_hex)
    await ws.send(json.dumps({"type": "heartbeat", "seq": 7, "future_field": 1}))
    ack = json.loads(await ws.recv())
    assert ack == {"type": "heartbeat_ack", "seq": 7}
    nodes = client.nodes()
    assert [n.id for n in nodes] == [welcome["node_id"]]
    assert nodes[0].owner == owner.public_hex
    assert nodes[0].state == "verifying"  # until its CPU passes the hardware challenge
    await ws.close()


@pytest.mark.parametrize(
    ("make", "code", "needle"),
    [
        (lambda n, a, b: "this is not json", CLOSE_BAD_MESSAGE, "not valid JSON"),
        (lambda n, a, b: json.dumps({"type": "auth"}), CLOSE_BAD_MESSAGE, "bad message"),
        (
            lambda n, a, b: json.dumps(auth_message(n, a, b, sign_with=KeyPair.generate())),
            CLOSE_AUTH_FAILED,
            "nonce signature",
        ),
        (
            lambda n, a, b: json.dumps(auth_message("00" * 32, a, b)),
            CLOSE_AUTH_FAILED,
            "nonce signature",
        ),
        (
            lambda n, a, b: json.dumps({"type": "auth", "protocol": 0}),
            CLOSE_PROTOCOL_TOO_OLD,
            "too old",
        ),
        (
            lambda n, a, b: json.dumps(auth_message(n, a, b, region="mars")),
            CLOSE_BAD_MESSAGE,
            "invalid region",
        ),
        (
            lambda n, a, b: json.dumps(auth_message(n, a, b, price="-1")),
            CLOSE_BAD_MESSAGE,
            "price",
        ),
    ],
    ids=[
        "garbage",
        "missing-fields",
        "wrong-signer",
        "replayed-nonce",
        "old-protocol",
        "region",
        "price",
    ],
)
async def test_bad_handshakes_are_refused_and_write_nothing(
    coordinator: CoordinatorThread, client: LoomClient, make: object, code: int, needle: str
) -> None:
    node, owner = KeyPair.generate(), KeyPair.generate()
    ws, hello = await open_raw(coordinator.url)
    await ws.send(make(hello["nonce"], node, owner))  # type: ignore[operator]
    got_code, reason = await _closed_with(ws)
    assert got_code == code
    assert needle in reason
    assert client.nodes() == []


async def test_binary_frame_is_refused(coordinator: CoordinatorThread) -> None:
    ws, _hello = await open_raw(coordinator.url)
    await ws.send(b"\x00\x01binary")
    code, reason = await _closed_with(ws)
    assert code == CLOSE_BAD_MESSAGE and "binary" in reason


async def test_a_slow_handshake_closes_with_a_code_the_agent_retries(
    coordinator: CoordinatorThread,
) -> None:
    """A loaded machine may not answer the nonce in 10 s: that is no reason to give up."""
    from loom.agent.main import FATAL_CLOSE_CODES

    ws, _hello = await open_raw(coordinator.url)
    code, reason = await _closed_with(ws)  # we never send the auth message
    assert code == CLOSE_HANDSHAKE_TIMEOUT and "within 10 s" in reason
    assert code not in FATAL_CLOSE_CODES


async def test_owner_binding_by_other_key_refused(coordinator: CoordinatorThread) -> None:
    node, owner, mallory = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    ws, hello = await open_raw(coordinator.url)
    msg = auth_message(hello["nonce"], node, owner)
    msg["owner_key"] = mallory.public_hex
    await ws.send(json.dumps(msg))
    code, reason = await _closed_with(ws)
    assert code == CLOSE_AUTH_FAILED and "binding" in reason


async def test_garbage_after_handshake_closes_with_reason(coordinator: CoordinatorThread) -> None:
    node, owner = KeyPair.generate(), KeyPair.generate()
    ws, hello = await open_raw(coordinator.url)
    await ws.send(json.dumps(auth_message(hello["nonce"], node, owner)))
    json.loads(await ws.recv())
    await ws.send(json.dumps({"type": "launch_missiles"}))
    code, reason = await _closed_with(ws)
    assert code == CLOSE_BAD_MESSAGE and "bad message" in reason


async def test_oversized_frame_is_refused(coordinator: CoordinatorThread) -> None:
    ws, _hello = await open_raw(coordinator.url)
    await ws.send("x" * (2 << 20))
    with pytest.raises(ConnectionClosed) as info:
        await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
