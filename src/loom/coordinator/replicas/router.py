"""Commands for an agent whose socket another replica holds: NATS request/reply.

The sender looks the holder up in ``agent_sessions`` (the only source of truth) and sends
the command, unchanged (its name and args JSON), as a request to
``loom.replica.<holder>.cmd``. The holder's responder hands it to its own hub, which
sends the ``Command`` frame and awaits the agent's ``Ack``; the reply carries that ack
back. What can go wrong maps onto the hub's two errors:

- no session, a session held by this very replica without a socket here, nobody
  subscribed to the holder's subject (it died), or the holder has no socket for the
  agent either → :class:`AgentNotConnected` (the agent is reconnecting; callers retry
  or heal as they do for a local disconnect);
- no reply in the command's timeout (plus a little for the hop) →
  :class:`CommandFailed`, as a local ack timeout is.

The holder runs each request in its own task: a 90 s ``member.start`` never holds up
other commands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Literal

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.agent_client import AgentClient
from loom.coordinator.hub import AgentHub, AgentNotConnected, CommandFailed
from loom.coordinator.replicas import sessions
from loom.coordinator.replicas.link import NatsLink
from loom.protocol.messages import Ack

log = logging.getLogger(__name__)

#: Added to a command's own timeout for the hop between replicas.
HOP_S = 5.0


def command_subject(replica_id: str) -> str:
    return f"loom.replica.{replica_id}.cmd"


class RoutedCommand(BaseModel):
    """A command for ``node_id``, from one replica to the holder of its socket."""

    model_config = ConfigDict(extra="ignore")
    node_id: str
    name: str
    args_json: str
    timeout: float
    #: False: deliver and do not wait for the agent's ack (``notify``).
    wait: bool = True


class RoutedReply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ack: Ack | None = None
    error: Literal["", "not_connected", "failed"] = ""
    message: str = ""


class CommandResponder:
    """The holder's side: serve ``loom.replica.<me>.cmd`` from this replica's hub."""

    def __init__(self, link: NatsLink, hub: AgentHub) -> None:
        self.link = link
        self.hub = hub
        self.served = 0
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self.link.nc.subscribe(
            command_subject(self.link.replica_id), cb=self._on_request
        )
        await self.link.registered()

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed", exc_info=True)
            self._sub = None
        for task in list(self._tasks):
            task.cancel()

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, msg: Msg) -> None:
        try:
            req = RoutedCommand.model_validate_json(msg.data)
        except ValidationError:
            reply = RoutedReply(error="failed", message="unreadable routed command")
        else:
            reply = await self._deliver(req)
        self.served += 1
        if msg.reply:
            try:
                await msg.respond(reply.model_dump_json().encode())
            except Exception as exc:  # the asker gave up, or the link dropped
                log.debug("routed reply lost: %s", exc)

    async def _deliver(self, req: RoutedCommand) -> RoutedReply:
        try:
            conn = self.hub.get(req.node_id)
            if not req.wait:
                await conn.post(req.name, req.args_json)
                return RoutedReply()
            return RoutedReply(ack=await conn.request(req.name, req.args_json, timeout=req.timeout))
        except AgentNotConnected as exc:
            return RoutedReply(error="not_connected", message=str(exc))
        except CommandFailed as exc:
            return RoutedReply(error="failed", message=str(exc))
        except Exception as exc:  # the socket broke mid-send: the agent is reconnecting
            return RoutedReply(error="not_connected", message=f"{type(exc).__name__}: {exc}")


class RoutedAgentClient(AgentClient):
    """``state.agents`` on a replica: the local socket if this replica holds the agent,
    else a NATS request to the replica that does."""

    def __init__(
        self,
        hub: AgentHub,
        link: NatsLink,
        session: Callable[[], AbstractAsyncContextManager[AsyncSession]],
    ) -> None:
        super().__init__(hub)
        self.link = link
        self._session = session
        self.routed = 0

    def reachable(self, node_id: str) -> bool:
        return node_id in self.hub.present

    async def _send(self, node_id: str, name: str, args_json: str, timeout: float) -> Ack:
        if self.hub.is_connected(node_id):
            return await super()._send(node_id, name, args_json, timeout)
        reply = await self._route(RoutedCommand(
            node_id=node_id, name=name, args_json=args_json, timeout=timeout
        ))  # fmt: skip
        if reply.ack is None:
            raise CommandFailed(f"{name}: the replica holding node {node_id} sent no ack")
        return reply.ack

    async def _post(self, node_id: str, name: str, args_json: str) -> None:
        if self.hub.is_connected(node_id):
            await super()._post(node_id, name, args_json)
            return
        await self._route(RoutedCommand(
            node_id=node_id, name=name, args_json=args_json, timeout=10.0, wait=False
        ))  # fmt: skip

    async def _route(self, req: RoutedCommand) -> RoutedReply:
        async with self._session() as session:
            held = await sessions.holder(session, req.node_id)
        me = self.link.replica_id
        if held is None or held.replica_id == me:
            # Held by nobody, or by us without a socket here: the agent is between sockets.
            raise AgentNotConnected(f"node {req.node_id} is not connected")
        self.routed += 1
        try:
            msg = await self.link.nc.request(
                command_subject(held.replica_id),
                req.model_dump_json().encode(),
                timeout=req.timeout + HOP_S,
            )
        except nats.errors.NoRespondersError:
            raise AgentNotConnected(
                f"node {req.node_id}: its coordinator replica {held.replica_id} is gone"
            ) from None
        except nats.errors.TimeoutError:
            raise CommandFailed(
                f"{req.name}: no answer from node {req.node_id} (via replica "
                f"{held.replica_id}) in {req.timeout + HOP_S:g} s"
            ) from None
        except nats.errors.Error as exc:
            raise AgentNotConnected(f"node {req.node_id}: the bus failed: {exc}") from None
        try:
            reply = RoutedReply.model_validate_json(msg.data)
        except ValidationError:
            raise CommandFailed(f"{req.name}: unreadable reply from {held.replica_id}") from None
        if reply.error == "not_connected":
            raise AgentNotConnected(reply.message)
        if reply.error == "failed":
            raise CommandFailed(reply.message)
        return reply
