"""The coordinator's live view of connected agents: one `AgentConnection` per node.

Commands go down with an id and come back as an `ack`; `request` awaits it (callers use
the typed `loom.coordinator.agent_client.AgentClient`, which sits on top). Facts that
agents report are handed to registered handlers (the cluster and challenge services
plug in here) so this module knows nothing of clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator, Set
from dataclasses import dataclass, field
from typing import Protocol

from loom.coordinator.services.heartbeats import HeartbeatBuffer
from loom.protocol.messages import CLOSE_REPLACED, Ack, Report

log = logging.getLogger(__name__)


class Sender(Protocol):
    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class CommandFailed(RuntimeError):
    pass


class AgentNotConnected(RuntimeError):
    pass


ReportHandler = Callable[[str, Report, float], Awaitable[None]]
"""(node id, report, coordinator `time.monotonic()` when its frame arrived)."""
NodeHook = Callable[[str], Awaitable[None]]


@dataclass(eq=False)
class AgentConnection:
    node_id: str
    ws: Sender
    connected_at: float
    pending: dict[str, asyncio.Future[Ack]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    #: The agent session's epoch this replica claimed (loom.coordinator.replicas.sessions).
    epoch: int = 0

    async def send_text(self, text: str) -> None:
        async with self.lock:
            await self.ws.send_text(text)

    async def request(self, name: str, args_json: str, *, timeout: float) -> Ack:
        """Send command ``name`` (``args_json``: its args as JSON text) and await its ack.

        The transport under ``AgentClient`` (use that: it types the command and reply).
        Raises CommandFailed when no ack comes in ``timeout`` s; a negative ack is returned.
        """
        cmd_id = secrets.token_hex(8)
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self.pending[cmd_id] = fut
        try:
            await self.send_text(_command_frame(cmd_id, name, args_json))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise CommandFailed(
                f"{name}: no answer from node {self.node_id} in {timeout:g} s"
            ) from None
        finally:
            self.pending.pop(cmd_id, None)

    async def post(self, name: str, args_json: str) -> None:
        """Send command ``name`` without waiting for its ack (its ack is ignored)."""
        await self.send_text(_command_frame(secrets.token_hex(8), name, args_json))

    def resolve(self, ack: Ack) -> None:
        fut = self.pending.get(ack.id)
        if fut is not None and not fut.done():
            fut.set_result(ack)

    def fail_pending(self, reason: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(AgentNotConnected(reason))
        self.pending.clear()


def _command_frame(cmd_id: str, name: str, args_json: str) -> str:
    """A ``Command`` frame around args that are already JSON (no re-encoding)."""
    return f'{{"type":"command","id":"{cmd_id}","name":{json.dumps(name)},"args":{args_json}}}'


class AgentHub:
    def __init__(self) -> None:
        self.connections: dict[str, AgentConnection] = {}
        self.heartbeats = HeartbeatBuffer()
        self.report_handlers: dict[str, list[ReportHandler]] = {}
        self.on_connect: list[NodeHook] = []
        self.on_offline: list[NodeHook] = []
        #: node → the session epoch this replica last claimed for it (kept after a detach:
        #: a late heartbeat flush stays fenced by it).
        self.epochs: dict[str, int] = {}
        #: Agents whose sockets other replicas hold (node → that replica's id), from the
        #: bus's presence events and the agent_sessions table (loom.coordinator.replicas).
        self.remote: dict[str, str] = {}
        #: Every agent connected to any replica: what placement and offers call connected.
        self.present = Presence(self)

    async def attach(self, node_id: str, ws: Sender, now: float, epoch: int = 0) -> AgentConnection:
        old = self.connections.get(node_id)
        conn = AgentConnection(node_id=node_id, ws=ws, connected_at=now, epoch=epoch)
        self.connections[node_id] = conn
        self.epochs[node_id] = epoch
        self.remote.pop(node_id, None)
        if old is not None:
            old.closed = True
            old.fail_pending("replaced by a newer connection")
            with contextlib.suppress(Exception):
                await old.ws.close(code=CLOSE_REPLACED, reason="replaced by a newer connection")
        return conn

    def detach(self, conn: AgentConnection) -> bool:
        """Forget `conn`; True if it was the node's current connection."""
        conn.closed = True
        conn.fail_pending("agent disconnected")
        if self.connections.get(conn.node_id) is conn:
            del self.connections[conn.node_id]
            return True
        return False

    def get(self, node_id: str) -> AgentConnection:
        conn = self.connections.get(node_id)
        if conn is None:
            raise AgentNotConnected(f"node {node_id} is not connected")
        return conn

    def is_connected(self, node_id: str) -> bool:
        return node_id in self.connections

    def on_report(self, kind: str, handler: ReportHandler) -> None:
        self.report_handlers.setdefault(kind, []).append(handler)

    async def dispatch_report(self, node_id: str, report: Report, received_at: float) -> None:
        for handler in self.report_handlers.get(report.kind, []):
            try:
                await handler(node_id, report, received_at)
            except Exception:
                log.exception("report handler for %s failed", report.kind)

    async def run_hooks(self, hooks: list[NodeHook], node_id: str) -> None:
        for hook in hooks:
            try:
                await hook(node_id)
            except Exception:
                log.exception("node hook failed for %s", node_id)


class Presence(Set[str]):
    """A live view: the nodes connected here or (as far as we know) to another replica."""

    def __init__(self, hub: AgentHub) -> None:
        self._hub = hub

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._hub.connections or node_id in self._hub.remote

    def __iter__(self) -> Iterator[str]:
        yield from self._hub.connections
        for node_id in list(self._hub.remote):
            if node_id not in self._hub.connections:
                yield node_id

    def __len__(self) -> int:
        return len(self._hub.connections) + sum(
            1 for n in self._hub.remote if n not in self._hub.connections
        )
