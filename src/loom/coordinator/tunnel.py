"""The tunnel relay: a user's WebSocket ⇄ one stream on the head agent's WebSocket.

Each agent connection gets an `AgentLink` holding its open streams. The coordinator opens
a stream (OPEN → OPENED) for an authorized user request, then `relay` copies bytes both
ways under the credit windows of `loom.protocol.tunnel`: data from the agent waits in a
per-stream queue bounded by the window the coordinator granted, and data from the user
is read only when the agent has granted credit for it. A slow reader on either side thus
stalls its sender instead of growing the coordinator's memory.

Who may relay to what: only the cluster's owner (a signed request), only to the head's
Ray dashboard/Jobs API port or Ray client port of a running cluster (`resolve_target`);
the agent checks the port again against its own running head members.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, cast
from urllib.parse import urlsplit

from sqlalchemy import select
from starlette.websockets import WebSocket, WebSocketState

from loom.coordinator.db.models import Member
from loom.coordinator.errors import BadRequest, Conflict, ServiceError
from loom.coordinator.hub import AgentConnection, AgentHub
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import ClusterState, MemberState
from loom.protocol.messages import CLOSE_BAD_MESSAGE
from loom.protocol.tunnel import (
    CLOSE_STREAM_RESET,
    EOF_TEXT,
    MAX_DATA,
    TARGETS,
    Kind,
    ReceiveWindow,
    SendWindow,
    StreamClosed,
    TunnelProtocolError,
    close_frame,
    data_frame,
    decode,
    eof_frame,
    is_eof_text,
    open_frame,
    window_frame,
    window_increment,
)

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 15.0
#: Streams at once through one agent connection.
MAX_STREAMS_PER_AGENT = 256


class _BinarySender(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...


class TunnelError(ServiceError):
    """The head agent could not open the stream (502)."""

    status = 502


class Unavailable(ServiceError):
    status = 503


@dataclass(frozen=True)
class Target:
    node_id: str
    host: str
    port: int


@dataclass(frozen=True)
class _Aborted:
    reason: str


_EOF = object()


@dataclass(eq=False)
class RelayStream:
    id: int
    link: AgentLink
    send_window: SendWindow = field(default_factory=SendWindow)
    recv_window: ReceiveWindow = field(default_factory=ReceiveWindow)
    inbox: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    opened: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    closed: bool = False

    def abort(self, reason: str) -> None:
        """Stop both directions; the user side learns `reason` after what is queued."""
        if self.closed:
            return
        self.closed = True
        self.link.streams.pop(self.id, None)
        self.send_window.close(reason)
        if not self.opened.done():
            self.opened.set_exception(TunnelError("tunnel_refused", reason))
            self.opened.exception()  # retrieved: nobody may wait any more
        self.inbox.put_nowait(_Aborted(reason))

    def finish(self) -> None:
        """Normal end (EOF both ways): forget the stream."""
        self.closed = True
        self.link.streams.pop(self.id, None)
        self.send_window.close("stream ended")


@dataclass(eq=False)
class Forward:
    """A stream this replica carries for a user on another replica: frames from the agent
    go to ``deliver`` verbatim (``loom.coordinator.tunnel_remote``)."""

    id: int
    origin: str
    deliver: Callable[[bytes], Awaitable[None]]


class AgentLink:
    """The tunnel streams carried by one agent connection."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn
        self.streams: dict[int, RelayStream] = {}
        self.forwarded: dict[int, Forward] = {}
        self._ids = itertools.count(1)
        self.lost: str | None = None

    def _room(self) -> None:
        if self.lost is not None or self.conn.closed:
            raise Unavailable("head_unreachable", "the head's agent is not connected")
        if len(self.streams) + len(self.forwarded) >= MAX_STREAMS_PER_AGENT:
            raise Unavailable(
                "tunnel_busy", f"too many tunnels to this head (at most {MAX_STREAMS_PER_AGENT})"
            )

    async def open_forward(
        self, host: str, port: int, origin: str, deliver: Callable[[bytes], Awaitable[None]]
    ) -> int:
        """Open a stream for another replica's user; returns its id. The agent's OPENED
        (or CLOSE) goes to ``deliver`` like every later frame of the stream."""
        self._room()
        fwd = Forward(next(self._ids), origin, deliver)
        self.forwarded[fwd.id] = fwd
        try:
            await self.send(open_frame(fwd.id, host, port))
        except Exception:
            self.forwarded.pop(fwd.id, None)
            raise Unavailable("head_unreachable", "the head's agent went away") from None
        return fwd.id

    async def forward_in(self, origin: str, data: bytes) -> None:
        """A frame from ``origin``'s user for one of its forwarded streams: to the agent."""
        frame = decode(data)
        fwd = self.forwarded.get(frame.stream)
        if fwd is None or fwd.origin != origin or frame.kind == Kind.OPEN:
            return  # raced a close, or not that replica's stream
        if frame.kind == Kind.CLOSE:
            self.forwarded.pop(frame.stream, None)
        await self.send(data)

    async def send(self, data: bytes) -> None:
        ws = cast(_BinarySender, self.conn.ws)
        async with self.conn.lock:
            await ws.send_bytes(data)

    async def open(self, host: str, port: int, timeout: float = OPEN_TIMEOUT_S) -> RelayStream:
        self._room()
        stream = RelayStream(next(self._ids), self)
        self.streams[stream.id] = stream
        await self._await_open(stream, open_frame(stream.id, host, port), host, port, timeout)
        return stream

    async def _await_open(
        self, stream: RelayStream, frame: bytes | None, host: str, port: int, timeout: float
    ) -> None:
        try:
            if frame is not None:
                await self.send(frame)
            await asyncio.wait_for(asyncio.shield(stream.opened), timeout)
        except TimeoutError:
            stream.abort("no answer from the head's agent")
            await self.tell_close(stream.id, "open timed out")
            raise TunnelError(
                "tunnel_timeout", f"the head's agent did not open {host}:{port} in {timeout:g} s"
            ) from None
        except TunnelError:
            raise
        except Exception as exc:
            stream.abort(f"{type(exc).__name__}: {exc}")
            raise Unavailable("head_unreachable", "the head's agent went away") from None

    async def on_frame(self, data: bytes) -> None:
        """One binary frame from the agent (raises TunnelProtocolError if it is garbage)."""
        frame = decode(data)
        if frame.kind == Kind.OPEN:
            raise TunnelProtocolError("agents do not open tunnel streams")
        fwd = self.forwarded.get(frame.stream)
        if fwd is not None:  # another replica's user: pass it on as it came
            if frame.kind == Kind.CLOSE:
                self.forwarded.pop(frame.stream, None)
            with contextlib.suppress(Exception):
                await fwd.deliver(data)
            return
        stream = self.streams.get(frame.stream)
        if stream is None or stream.closed:
            return  # raced a close
        if frame.kind == Kind.OPENED:
            if not stream.opened.done():
                stream.opened.set_result(None)
        elif frame.kind == Kind.DATA:
            try:
                stream.recv_window.receive(len(frame.payload))
            except TunnelProtocolError as exc:
                stream.abort(str(exc))
                await self.tell_close(stream.id, str(exc))
                return
            stream.inbox.put_nowait(frame.payload)
        elif frame.kind == Kind.WINDOW:
            stream.send_window.grant(window_increment(frame))
        elif frame.kind == Kind.EOF:
            stream.inbox.put_nowait(_EOF)
        elif frame.kind == Kind.CLOSE:
            reason = frame.payload.decode(errors="replace") or "closed by the head's agent"
            stream.abort(reason)

    def connection_lost(self) -> None:
        self.lost = "the head's agent disconnected"
        for stream in list(self.streams.values()):
            stream.abort(self.lost)
        forwarded, self.forwarded = self.forwarded, {}
        for fwd in forwarded.values():  # the other replica's user learns it too
            task = asyncio.ensure_future(fwd.deliver(close_frame(fwd.id, self.lost)))
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def tell_close(self, stream_id: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.send(close_frame(stream_id, reason))


_links: weakref.WeakKeyDictionary[AgentConnection, AgentLink] = weakref.WeakKeyDictionary()
_closing: set[asyncio.Future[None]] = set()
RemoteOpener = Callable[["Target"], Awaitable[RelayStream]]
#: Per coordinator (keyed by its hub): how to reach a head whose agent another replica
#: holds (installed by ``loom.coordinator.tunnel_remote`` when replicas are on).
_remote: weakref.WeakKeyDictionary[AgentHub, RemoteOpener] = weakref.WeakKeyDictionary()


def install_remote(hub: AgentHub, opener: RemoteOpener) -> None:
    _remote[hub] = opener


def link_for(conn: AgentConnection) -> AgentLink:
    link = _links.get(conn)
    if link is None:
        link = _links[conn] = AgentLink(conn)
    return link


def connection_closed(conn: AgentConnection) -> None:
    """The agent's WebSocket is gone: every stream through it ends."""
    link = _links.pop(conn, None)
    if link is not None:
        link.connection_lost()


# -- who may reach what ------------------------------------------------------------------


async def resolve_target(state: CoordinatorState, caller: str, ref: str, target: str) -> Target:
    """The head's (node, host, port) for `target`, for the cluster's owner only."""
    if target not in TARGETS:
        raise BadRequest(
            "bad_tunnel_target", f"port must be one of {', '.join(TARGETS)}", field="port"
        )
    async with state.session() as session:
        cluster = await cluster_service.get_cluster(session, caller, ref)  # 404 for others
        if cluster.state not in (ClusterState.RUNNING.value, ClusterState.HEALING.value):
            raise Conflict(
                "cluster_not_running",
                f"cluster {cluster.name} is {cluster.state}; a tunnel needs it running",
            )
        head = await session.scalar(
            select(Member).where(
                Member.cluster_id == cluster.id,
                Member.role == "head",
                Member.state == MemberState.READY.value,
            )
        )
        address = cluster.dashboard_url if target == "dashboard" else cluster.client_address
    if head is None or not address:
        raise Conflict("no_head", f"cluster {cluster.name} has no ready head with a {target} port")
    parts = urlsplit(address)
    if parts.hostname is None or parts.port is None:
        raise Conflict("no_head", f"the head's {target} address {address!r} has no port")
    return Target(head.node_id, parts.hostname, parts.port)


async def open_stream(state: CoordinatorState, target: Target) -> RelayStream:
    conn = state.hub.connections.get(target.node_id)
    remote = _remote.get(state.hub)
    if conn is None and remote is not None:
        return await remote(target)  # the head's agent is on another replica
    if conn is None:
        raise Unavailable(
            "head_unreachable", "the head's agent is not connected to the coordinator right now"
        )
    return await link_for(conn).open(target.host, target.port)


# -- pumping -----------------------------------------------------------------------------


class _Abort(Exception):
    def __init__(self, reason: str, code: int = CLOSE_STREAM_RESET, *, tell_agent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.tell_agent = tell_agent


async def relay(stream: RelayStream, ws: WebSocket) -> None:
    """Copy bytes between the accepted user WebSocket and `stream` until either ends."""
    user_eof, agent_eof = asyncio.Event(), asyncio.Event()
    up = asyncio.create_task(_user_to_agent(stream, ws, user_eof, agent_eof))
    down = asyncio.create_task(_agent_to_user(stream, ws, agent_eof))

    async def both_ended() -> None:
        await down
        await user_eof.wait()

    done_both = asyncio.create_task(both_ended())
    code, reason = 1000, ""
    try:
        done, _ = await asyncio.wait({up, done_both}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        stream.finish()
    except _Abort as exc:
        code, reason = exc.code, exc.reason
        stream.abort(reason)
        if exc.tell_agent:
            await stream.link.tell_close(stream.id, reason)
    except Exception as exc:
        log.warning("tunnel stream %d failed: %s: %s", stream.id, type(exc).__name__, exc)
        code, reason = 1011, "relay failed"
        stream.abort(reason)
        await stream.link.tell_close(stream.id, reason)
    finally:
        for task in (up, down, done_both):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(code=code, reason=reason.encode()[:120].decode(errors="ignore"))


async def _user_to_agent(
    stream: RelayStream, ws: WebSocket, user_eof: asyncio.Event, agent_eof: asyncio.Event
) -> None:
    link = stream.link
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            if user_eof.is_set() and agent_eof.is_set():
                return
            raise _Abort("the user disconnected", tell_agent=True)
        if user_eof.is_set():
            raise _Abort("frame after eof", CLOSE_BAD_MESSAGE, tell_agent=True)
        data = message.get("bytes")
        if data is not None:
            view = memoryview(data)
            while view:
                try:
                    n = await stream.send_window.take(min(len(view), MAX_DATA))
                except StreamClosed as exc:
                    raise _Abort(str(exc), tell_agent=False) from None
                await link.send(data_frame(stream.id, bytes(view[:n])))
                view = view[n:]
        elif is_eof_text(message.get("text")):
            await link.send(eof_frame(stream.id))
            user_eof.set()
        else:
            raise _Abort("tunnel text frames must be {\"type\": \"eof\"}", CLOSE_BAD_MESSAGE,
                         tell_agent=True)  # fmt: skip


async def _agent_to_user(stream: RelayStream, ws: WebSocket, agent_eof: asyncio.Event) -> None:
    link = stream.link
    while True:
        item = await stream.inbox.get()
        if isinstance(item, _Aborted):
            raise _Abort(item.reason, tell_agent=False)
        try:
            if item is _EOF:
                await ws.send_text(EOF_TEXT)
                agent_eof.set()
                return
            assert isinstance(item, bytes)
            await ws.send_bytes(item)
        except Exception as exc:
            raise _Abort(f"the user went away: {type(exc).__name__}", tell_agent=True) from None
        stream.recv_window.release(len(item))
        with contextlib.suppress(Exception):
            await link.send(window_frame(stream.id, len(item)))
