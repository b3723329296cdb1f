"""The tunnel's frames between replicas: the user on one replica, the head's agent on another.

Three subjects per replica (``<r>`` is a replica id):

- ``loom.tunnel.<r>.open`` (request): open a stream to ``host:port`` on the agent of
  ``node`` that replica ``r`` holds; the reply is the stream id the agent will use (or
  an error code and message, as the local tunnel's errors);
- ``loom.tunnel.<r>.to`` (publish, headers ``node`` and ``origin``): one raw tunnel frame
  for that agent, sent verbatim on its socket;
- ``loom.tunnel.<r>.back`` (publish, header ``node``): one raw tunnel frame from that
  agent, for the replica whose user opened the stream.

Frames are the agent protocol's own (``loom.protocol.tunnel``), unchanged: the credit
windows work end to end between the user's replica and the agent, so the holder in the
middle never buffers more than NATS does. NATS keeps one publisher's order on a subject
and a subscription's callbacks run one at a time, so the frames of a stream stay in order.

The open's reply and the stream's first frames travel on different subjects, so the
agent's OPENED may be heard before the reply that names its stream (each subscription
has its own task). While an open to a node is in flight, the frames coming back from that
node are held, and handed on in order once the opener has registered its stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from loom.coordinator.replicas.link import NatsLink

log = logging.getLogger(__name__)

OpenHandler = Callable[[str, str, int, str], Awaitable[int]]
"""(node id, host, port, origin replica) → the stream id; raises RemoteOpenRefused."""
FrameHandler = Callable[[str, str, bytes], Awaitable[None]]
"""(node id, origin replica, raw frame)."""


class RemoteOpenRefused(Exception):
    def __init__(self, code: str, message: str, *, busy: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.busy = busy


def _subject(replica_id: str, what: str) -> str:
    return f"loom.tunnel.{replica_id}.{what}"


class TunnelBus:
    def __init__(self, link: NatsLink) -> None:
        self.link = link
        self.on_open: OpenHandler | None = None
        self.on_to_agent: FrameHandler | None = None
        self.on_back: FrameHandler | None = None
        self.frames_out = 0
        self.frames_in = 0
        self._subs: list[Subscription] = []
        #: Opens in flight per node, and the frames back from it held meanwhile.
        self._opening: dict[str, int] = {}
        self._held: dict[str, list[bytes]] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        self._draining: set[str] = set()

    async def start(self) -> None:
        me = self.link.replica_id
        nc = self.link.nc
        self._subs = [
            await nc.subscribe(_subject(me, "open"), cb=self._serve_open),
            await nc.subscribe(_subject(me, "to"), cb=self._serve_to),
            await nc.subscribe(_subject(me, "back"), cb=self._serve_back),
        ]
        await self.link.registered()

    async def close(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed", exc_info=True)
        self._subs = []

    # -- the user's replica ---------------------------------------------------------

    async def open(self, holder: str, node_id: str, host: str, port: int, timeout: float) -> int:
        body = {"node": node_id, "host": host, "port": port, "origin": self.link.replica_id}
        self._opening[node_id] = self._opening.get(node_id, 0) + 1
        try:
            msg = await self.link.nc.request(
                _subject(holder, "open"), json.dumps(body).encode(), timeout=timeout
            )
        except nats.errors.NoRespondersError:
            raise RemoteOpenRefused(
                "head_unreachable", "the coordinator replica holding the head's agent is gone"
            ) from None
        except nats.errors.Error as exc:
            raise RemoteOpenRefused(
                "head_unreachable", f"the replica holding the head's agent did not answer: {exc}"
            ) from None
        finally:
            self._opened(node_id)
        try:
            reply = json.loads(msg.data)
            if "stream" in reply:
                return int(reply["stream"])
            code, message = str(reply["error"]), str(reply.get("message", ""))
        except (ValueError, KeyError, TypeError):
            code, message = "head_unreachable", "unreadable answer from the head's replica"
        raise RemoteOpenRefused(code, message, busy=code == "tunnel_busy")

    def _opened(self, node_id: str) -> None:
        """An open to ``node_id`` got its answer: release what was held once the caller
        (which resumes first, in this same step) has registered its stream."""
        left = self._opening.get(node_id, 1) - 1
        if left > 0:
            self._opening[node_id] = left
            return
        self._opening.pop(node_id, None)
        if node_id in self._held and node_id not in self._draining:
            self._draining.add(node_id)
            task = asyncio.create_task(self._release(node_id))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _release(self, node_id: str) -> None:
        try:
            held = self._held.get(node_id)
            while held:
                await self._deliver_back(node_id, held.pop(0))
        finally:
            self._draining.discard(node_id)
        # New frames were appended meanwhile; an open begun since keeps holding them.
        if not self._opening.get(node_id):
            self._held.pop(node_id, None)

    async def to_agent(self, holder: str, node_id: str, frame: bytes) -> None:
        self.frames_out += 1
        await self.link.nc.publish(
            _subject(holder, "to"), frame, headers={"node": node_id, "origin": self.link.replica_id}
        )

    # -- the holder of the agent's socket -------------------------------------------

    async def back(self, origin: str, node_id: str, frame: bytes) -> None:
        self.frames_out += 1
        await self.link.nc.publish(_subject(origin, "back"), frame, headers={"node": node_id})

    async def _serve_open(self, msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            node_id, host, port = str(body["node"]), str(body["host"]), int(body["port"])
            origin = str(body["origin"])
        except (ValueError, KeyError, TypeError):
            await msg.respond(json.dumps({"error": "bad_request", "message": "bad open"}).encode())
            return
        if self.on_open is None:
            reply: dict[str, object] = {"error": "head_unreachable", "message": "no tunnel here"}
        else:
            try:
                reply = {"stream": await self.on_open(node_id, host, port, origin)}
            except RemoteOpenRefused as exc:
                reply = {"error": exc.code, "message": exc.message}
        try:
            await msg.respond(json.dumps(reply).encode())
        except Exception as exc:
            log.debug("tunnel open reply lost: %s", exc)

    async def _serve_to(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if self.on_to_agent is not None and "node" in headers and "origin" in headers:
            self.frames_in += 1
            try:
                await self.on_to_agent(headers["node"], headers["origin"], msg.data)
            except Exception:
                log.exception("forwarding a tunnel frame to node %s failed", headers["node"])

    async def _serve_back(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if "node" not in headers:
            return
        node_id = headers["node"]
        self.frames_in += 1
        held = self._held.get(node_id)
        if held is not None:
            held.append(msg.data)
        elif self._opening.get(node_id):
            self._held[node_id] = [msg.data]
        else:
            await self._deliver_back(node_id, msg.data)

    async def _deliver_back(self, node_id: str, frame: bytes) -> None:
        if self.on_back is None:
            return
        try:
            await self.on_back(node_id, "", frame)
        except Exception:
            log.exception("a tunnel frame from node %s failed", node_id)
