"""The handshake's database writes, in batches: many agents registered per transaction.

Each handshake hands its checked registration to :class:`Registrar` and awaits its own
outcome: the node's row and devices written (``services.nodes.register``) and the agent's
session claimed at a new epoch (``replicas.sessions.claim``, the fencing of every later
write on the agent's behalf — one upsert per agent, in the same transaction as its
registration, exactly as strong as one transaction per agent). A batch starts at once when
the registrar is idle; registrations that arrive while it runs wait for the next one, so a
reconnect storm costs one transaction (one node read per :data:`CHUNK` ids, one commit) per
batch instead of one per agent, and holds one pooled connection, not one per handshake.

A banned or removed node is refused before anything is written for it. If a batch fails
as a whole (e.g. another replica registered the same new node at the same moment), its
registrations are retried one transaction each, so one bad registration refuses only
itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.batching import CHUNK, chunks
from loom.coordinator.db.models import Node
from loom.coordinator.replicas import sessions as agent_sessions
from loom.coordinator.services import nodes as node_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import NodeState
from loom.protocol.messages import CLOSE_BANNED

log = logging.getLogger(__name__)

#: Registrations per transaction (bounded: a batch of a storm stays short).
BATCH = 200

BANNED_REASON = "this node is banned (failed hardware verification)"
REMOVED_REASON = (
    "this node was removed by its owner; to add the machine again, start the agent with a "
    "new LOOM_HOME (a new node key)"
)


class Refused(Exception):
    """The node may not connect (banned, removed): close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Registered:
    """A written registration: the node's state now and the session's new epoch."""

    state: str
    epoch: int


@dataclass
class _Item:
    reg: node_service.Registration
    now: float
    address: str
    future: asyncio.Future[Registered]


class Registrar:
    """One per coordinator process; see the module docstring."""

    def __init__(self, state: CoordinatorState, *, batch: int = BATCH) -> None:
        self.state = state
        self.batch = batch
        self._queue: list[_Item] = []
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0  # batches written (metrics, tests)

    async def register(
        self, reg: node_service.Registration, now: float, address: str
    ) -> Registered:
        """Write ``reg`` and claim the agent's session; raises :class:`Refused`."""
        loop = asyncio.get_running_loop()
        item = _Item(reg, now, address, loop.create_future())
        self._queue.append(item)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="registrar")
            self.state.track(self._task)
        return await item.future

    async def _run(self) -> None:
        try:
            while self._queue:
                items, self._queue = self._queue[: self.batch], self._queue[self.batch :]
                await self._write(items)
        finally:  # cancelled (shutdown): the waiting handshakes fail, none hangs
            for item in self._queue:
                if not item.future.done():
                    item.future.cancel()

    async def _write(self, items: list[_Item]) -> None:
        # Rows locked in id order (a stable sort: one agent's handshakes keep their order,
        # the later one claiming the later epoch), as the ORM's flush orders its updates:
        # two batches, here or on another replica, never wait on each other in a cycle.
        items = sorted(items, key=lambda i: i.reg.node_id)
        try:
            async with self.state.session() as session:
                outcomes = await self._register_all(session, items)
                await session.commit()
        except asyncio.CancelledError:
            for item in items:
                if not item.future.done():
                    item.future.cancel()
            raise
        except Exception as exc:
            if len(items) == 1:
                if not items[0].future.done():
                    items[0].future.set_exception(exc)
                return
            log.warning("a batch of %d registrations failed (%s): one by one", len(items), exc)
            for item in items:
                await self._write([item])
            return
        self.transactions += 1
        for item, outcome in zip(items, outcomes, strict=True):
            if item.future.done():
                continue
            if isinstance(outcome, Refused):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    async def _register_all(
        self, session: AsyncSession, items: list[_Item]
    ) -> list[Registered | Refused]:
        # One read of the nodes (into the session's identity map, where `register` then
        # finds them without a query of its own).
        known: dict[str, Node] = {}
        for chunk in chunks(dict.fromkeys(i.reg.node_id for i in items), CHUNK):
            for node in (await session.execute(select(Node).where(Node.id.in_(chunk)))).scalars():
                known[node.id] = node
        replica_id = self.state.settings.replica_id
        out: list[Registered | Refused] = []
        for item in items:
            old = known.get(item.reg.node_id)
            if old is not None and old.state == NodeState.BANNED.value:
                out.append(Refused(CLOSE_BANNED, BANNED_REASON))
                continue
            if old is not None and old.state == NodeState.REMOVED.value:
                out.append(Refused(CLOSE_BANNED, REMOVED_REASON))
                continue
            node = await node_service.register(session, item.reg, item.now)
            known[node.id] = node
            # This replica now holds the agent: a new epoch fences whoever held it before.
            epoch = await agent_sessions.claim(
                session, item.reg.node_id, replica_id, item.now, item.address
            )
            out.append(Registered(node.state, epoch))
        return out
