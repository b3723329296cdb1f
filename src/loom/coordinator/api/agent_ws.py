"""The agent WebSocket: signed handshake, then typed messages both ways.

Garbage (non-JSON, unknown types, wrong shapes, oversized frames, binary frames that are
not tunnel frames of `loom.protocol.tunnel`) closes the socket with code 4003 and a
reason; a bad signature with 4001; an old protocol with 4002.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.routing import WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from loom.coordinator import tunnel
from loom.coordinator.api.deps import get_state
from loom.coordinator.hub import AgentConnection
from loom.coordinator.registration import Refused, Registrar
from loom.coordinator.replicas import sessions as agent_sessions
from loom.coordinator.services import nodes as node_service
from loom.coordinator.services.handshake import (
    HandshakeError,
    check_auth,
    check_inventory,
    refuse_old_protocol,
)
from loom.coordinator.state import CoordinatorState
from loom.core.models import NodeState
from loom.protocol.messages import (
    CLOSE_BAD_MESSAGE,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_REPLACED,
    MAX_FRAME_BYTES,
    Ack,
    Auth,
    Drain,
    Heartbeat,
    HeartbeatAck,
    Hello,
    InventoryUpdate,
    Report,
    Welcome,
    agent_message_adapter,
)
from loom.protocol.tunnel import TunnelProtocolError
from loom.protocol.version import MIN_AGENT_PROTOCOL, PROTOCOL_VERSION

log = logging.getLogger(__name__)
router = APIRouter()

HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_PRICE_MICRO = 300_000  # 0.30 credits per device-hour until the market says otherwise


class _Refuse(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:120]


async def _receive_json(ws: WebSocket) -> object:
    return (await _receive_timed(ws))[1]


async def _receive_timed(ws: WebSocket, *, binary: bool = False) -> tuple[float, object]:
    """The next frame, parsed, with `time.monotonic()` taken as it arrived (before parsing)."""
    message = await ws.receive()
    return _parse(message, time.monotonic(), binary=binary)


def _parse(message: Message, received_at: float, *, binary: bool) -> tuple[float, object]:
    """One received ASGI message as (arrival time, JSON value or tunnel bytes)."""
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None and binary and message.get("bytes") is not None:
        return received_at, bytes(message["bytes"])  # a tunnel frame (loom.protocol.tunnel)
    if text is None:
        raise _Refuse(
            CLOSE_BAD_MESSAGE, "binary frames are not part of the protocol; send JSON text"
        )
    if len(text) > MAX_FRAME_BYTES:
        raise _Refuse(CLOSE_BAD_MESSAGE, "frame too large")
    try:
        return received_at, json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep (fuzzing found it)
        raise _Refuse(CLOSE_BAD_MESSAGE, "frame is not valid JSON") from None


def _address(state: CoordinatorState) -> str:
    return f"http://{state.settings.host}:{state.settings.port}"


def _registrar(ws: WebSocket, state: CoordinatorState) -> Registrar:
    """The app's one registrar (made on the first handshake)."""
    app_state = ws.app.state
    registrar: Registrar | None = getattr(app_state, "registrar", None)
    if registrar is None or registrar.state is not state:
        registrar = app_state.registrar = Registrar(state)
    return registrar


def _describe(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "message"
    return f"bad message: {where}: {err.get('msg', 'invalid')}"


class _AgentSocket:
    """The route's endpoint, a plain ASGI app: the handshake and everything rare go through
    Starlette's `WebSocket`, the heartbeat loop through the ASGI ``receive``/``send`` that
    socket is built on (one wrapper less per frame each way, for 5,000+ beats/s)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await agent_ws(WebSocket(scope, receive, send), receive, send)


router.routes.append(WebSocketRoute("/v1/agent/ws", _AgentSocket(), name="agent_ws"))


async def agent_ws(ws: WebSocket, receive: Receive, send: Send) -> None:
    state = get_state(ws)  # type: ignore[arg-type]
    await ws.accept()
    conn: AgentConnection | None = None
    try:
        conn = await _handshake(state, ws)
        await _serve(state, ws, conn, receive, send)
    except _Refuse as exc:
        await _close(ws, exc.code, exc.reason)
    except HandshakeError as exc:
        await _close(ws, exc.code, exc.reason)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("agent connection failed")
        await _close(ws, 1011, "internal error")
    finally:
        # A dropped connection is not yet an offline node: the watchdog decides that
        # when heartbeats stop, so a quick reconnect keeps the node's members.
        if conn is not None:
            tunnel.connection_closed(conn)
            state.hub.detach(conn)


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    # A close reason must fit a control frame (123 bytes): cut by bytes, not characters.
    reason = reason.encode(errors="replace")[:120].decode(errors="ignore")
    if ws.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await ws.close(code=code, reason=reason)


async def _handshake(state: CoordinatorState, ws: WebSocket) -> AgentConnection:
    nonce = secrets.token_hex(32)
    hello = Hello(protocol=PROTOCOL_VERSION, min_protocol=MIN_AGENT_PROTOCOL, nonce=nonce)
    await ws.send_text(hello.model_dump_json())
    try:
        raw = await asyncio.wait_for(_receive_json(ws), HANDSHAKE_TIMEOUT_S)
    except TimeoutError:
        raise _Refuse(CLOSE_HANDSHAKE_TIMEOUT, "no auth message within 10 s") from None
    if isinstance(raw, dict) and isinstance(raw.get("protocol"), int):
        # Refuse an old agent before schema checks: it may not know today's fields.
        refuse_old_protocol(raw["protocol"])
    try:
        auth = Auth.model_validate(raw)
    except ValidationError as exc:
        raise _Refuse(CLOSE_BAD_MESSAGE, _describe(exc)) from None
    reg = check_auth(auth, nonce, default_price_micro=DEFAULT_PRICE_MICRO)
    now = time.time()
    # Written with the other handshakes of the moment in one transaction (one pooled
    # connection, whatever the storm), the agent's session claimed at a new epoch.
    try:
        written = await _registrar(ws, state).register(reg, now, _address(state))
    except Refused as exc:
        raise _Refuse(exc.code, exc.reason) from None
    conn = await state.hub.attach(reg.node_id, ws, now, written.epoch)
    state.hub.heartbeats.record(reg.node_id, now, "{}")
    welcome = Welcome(
        node_id=reg.node_id,
        heartbeat_interval_s=state.settings.heartbeat_interval_s,
        state=written.state,
    )
    # Welcome first: hooks may send commands, which the agent reads only after it.
    await conn.send_text(welcome.model_dump_json())
    await state.hub.run_hooks(state.hub.on_connect, reg.node_id)
    return conn


#: How every agent spells a heartbeat frame (``Heartbeat.model_dump_json``): such frames take
#: the fast path, validated from the JSON text in one pass; anything else (or a frame that
#: fails there) takes the general path, which names what is wrong.
_HEARTBEAT_PREFIX = '{"type":"heartbeat",'
_HEARTBEAT_ACK = '{"type":"heartbeat_ack","seq":%d}'


async def _serve(
    state: CoordinatorState, ws: WebSocket, conn: AgentConnection, receive: Receive, send: Send
) -> None:
    """The agent's messages after the handshake, until it leaves or is refused.

    ``receive``/``send`` are the socket's own ASGI channel: a heartbeat is read and acked
    on it directly. Its ack skips the connection's send lock, which only orders whole
    frames: the server writes each frame at once, whoever sends it.
    """
    hub = state.hub
    beats = hub.heartbeats
    node_id = conn.node_id
    monotonic, wall = time.monotonic, time.time
    while True:
        message = await receive()
        received_at = monotonic()
        text = message.get("text")
        if text is not None and text.startswith(_HEARTBEAT_PREFIX) and len(text) < 4096:
            try:
                beat = Heartbeat.model_validate_json(text)
            except ValidationError:
                pass  # the general path below closes with the reason
            else:
                if conn.closed:
                    return
                beats.record(node_id, wall(), beat.load)
                try:
                    await send({"type": "websocket.send", "text": _HEARTBEAT_ACK % beat.seq})
                except OSError:  # the agent is gone (as Starlette's own send would say)
                    raise WebSocketDisconnect(1006) from None
                continue
        received_at, raw = _parse(message, received_at, binary=True)
        if isinstance(raw, bytes):
            try:
                await tunnel.link_for(conn).on_frame(raw)
            except TunnelProtocolError as exc:
                raise _Refuse(CLOSE_BAD_MESSAGE, f"bad tunnel frame: {exc}") from None
            continue
        try:
            msg = agent_message_adapter.validate_python(raw)
        except ValidationError as exc:
            raise _Refuse(CLOSE_BAD_MESSAGE, _describe(exc)) from None
        if conn.closed:
            return
        if isinstance(msg, Heartbeat):
            beats.record(node_id, time.time(), msg.load)
            await conn.send_text(HeartbeatAck(seq=msg.seq).model_dump_json())
        elif isinstance(msg, Ack):
            conn.resolve(msg)
        elif isinstance(msg, Report):
            if not await _still_held(state, conn):
                raise _Refuse(CLOSE_REPLACED, "this agent reconnected to another replica")
            await hub.dispatch_report(conn.node_id, msg, received_at)
        elif isinstance(msg, InventoryUpdate):
            check_inventory(msg.inventory)  # a claim out of physical bounds closes (4003)
            if not await _still_held(state, conn):
                raise _Refuse(CLOSE_REPLACED, "this agent reconnected to another replica")
            async with state.session() as session:
                node = await node_service.get_node(session, conn.node_id)
                node_service.apply_inventory(node, msg.inventory)
                await node_service.sync_devices(session, node, msg.inventory)
                await session.commit()
        elif isinstance(msg, Drain):
            await _drain(state, conn, msg.reason)
            await _close(ws, 1000, "drained")
            return


async def _still_held(state: CoordinatorState, conn: AgentConnection) -> bool:
    """Whether this replica still holds the agent's session at the connection's epoch:
    writes on the agent's behalf (reports, inventory) are fenced by it."""
    async with state.session() as session:
        return await agent_sessions.holds(
            session, conn.node_id, state.settings.replica_id, conn.epoch
        )


async def _drain(state: CoordinatorState, conn: AgentConnection, reason: str) -> None:
    """A supplier stopped its agent on purpose: the node is ``drained``, not ``offline``.

    The state is written before the offline hooks run, so healing words the members'
    loss as a drain (``healing.on_node_offline`` reads it).
    """
    now = time.time()
    async with state.session() as session:
        node = await node_service.get_node(session, conn.node_id)
        if node.state != NodeState.BANNED.value:
            node_service.transition(
                session, node, NodeState.DRAINED, f"drained: {reason or 'agent stopped'}", now
            )
        node.connected_since = None
        await session.commit()
    await state.hub.run_hooks(state.hub.on_offline, conn.node_id)
