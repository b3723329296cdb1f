"""A hand-driven agent over a raw WebSocket, to test the handshake and bad input."""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from loom.protocol.identity import KeyPair, agent_auth_message, binding_message
from loom.protocol.messages import Auth, Inventory
from loom.protocol.version import PROTOCOL_VERSION


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/v1/agent/ws"


def auth_message(
    nonce: str,
    node: KeyPair,
    owner: KeyPair,
    *,
    protocol: int = PROTOCOL_VERSION,
    name: str = "raw",
    region: str = "eu-west",
    price: str = "0.25",
    sign_with: KeyPair | None = None,
) -> dict[str, Any]:
    signer = sign_with or node
    auth = Auth(
        protocol=protocol,
        node_key=node.public_hex,
        owner_key=owner.public_hex,
        binding_sig=owner.sign(binding_message(node.public_hex)).hex(),
        nonce_sig=signer.sign(agent_auth_message(nonce)).hex(),
        name=name,
        region=region,
        price=price,
        inventory=Inventory(cpu_model="test cpu", cpu_cores=2, ram_mb=4096, disk_free_mb=1000),
    )
    return auth.model_dump(mode="json")


async def open_raw(http_url: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(ws_url(http_url))
    hello = json.loads(await ws.recv())
    return ws, hello
