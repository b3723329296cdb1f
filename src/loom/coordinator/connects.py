"""What a coordinator does when agents connect, coalesced: one batch for many connects.

A handshake hands its node to :class:`ConnectBatch` and awaits only the node's activation
(``registering``/``offline``/``drained`` → ``verifying`` or ``available``, as
``services.lifecycle`` defines it), so a node is in its new state before its first
heartbeat is acked, as before. The batch then, for the same nodes, prepares the
challenger's first challenges (``Challenger.on_connected``: one read of the nodes, their
devices and their challenge history) and tells each agent which members it should run
(``member.sync``, from one query of live members).

Batching: a batch starts at once when none ran in the last :data:`INTERVAL_S`, otherwise
that long after the previous one started; the connects that arrive meanwhile wait for it.
A quiet coordinator therefore answers one connect with no added delay, and a reconnect
storm of thousands of agents costs a few transactions per :data:`INTERVAL_S` instead of a
handful per agent. Every query reads ids in bounded chunks (``db.batching``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import select

from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import Device, Member, Node
from loom.coordinator.hub import AgentNotConnected, CommandFailed
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.services import nodes as node_service
from loom.coordinator.services import verification as verification_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import DeviceState, NodeState

if TYPE_CHECKING:
    from loom.coordinator.challenger import Challenger

log = logging.getLogger(__name__)

INTERVAL_S = 0.1
#: Nodes per batch step (bounded: a step of a storm stays short, requests get in between).
BATCH = 500

#: The states a connect moves on (the others are left as they are: allocated, banned…).
_ENTRY = (
    NodeState.REGISTERING.value,
    NodeState.OFFLINE.value,
    NodeState.DRAINED.value,
    NodeState.VERIFYING.value,
)


class Coalescer:
    """Runs ``handler`` over the ids submitted since its last run (see the module doc).

    ``submit`` returns a future that is done once the run that includes the id has
    finished ``handler`` (its exceptions are logged, never raised to the submitter);
    ``after`` runs next for the same ids, before the following batch, not awaited by
    submitters.
    """

    def __init__(
        self,
        handler: Callable[[list[str]], Awaitable[None]],
        *,
        after: Callable[[list[str]], Awaitable[None]] | None = None,
        interval_s: float = INTERVAL_S,
        batch: int = BATCH,
        track: Callable[[asyncio.Task[None]], None] | None = None,
    ) -> None:
        self.handler = handler
        self.after = after
        self.interval_s = interval_s
        self.batch = batch
        self._track = track
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._round: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last = -float("inf")
        self.batches = 0  # handler runs so far (metrics, tests)
        self.items = 0

    def submit(self, node_id: str) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if self._round is None:
            self._round = loop.create_future()
        self._pending[node_id] = None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="connect-batch")
            if self._track is not None:
                self._track(self._task)
        return self._round

    async def _run(self) -> None:
        current: asyncio.Future[None] | None = None
        try:
            while self._pending:
                wait = self._last + self.interval_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                ids, current = list(self._pending), self._round
                self._pending, self._round = {}, None
                self._last = time.monotonic()
                for chunk in chunks(ids, self.batch):
                    await _guarded(self.handler, chunk)
                self.batches += 1
                self.items += len(ids)
                if current is not None and not current.done():
                    current.set_result(None)
                current = None
                if self.after is not None:
                    for chunk in chunks(ids, self.batch):
                        await _guarded(self.after, chunk)
        finally:  # cancelled (shutdown): nobody waits for a batch that will not run
            for fut in (current, self._round):
                if fut is not None and not fut.done():
                    fut.cancel()

    async def idle(self) -> None:
        """Return once every id submitted so far has been through ``handler`` and ``after``."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)


async def _guarded(fn: Callable[[list[str]], Awaitable[None]], ids: list[str]) -> None:
    try:
        await fn(ids)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("connect batch of %d node(s) failed", len(ids))


async def activate_many(state: CoordinatorState, node_ids: Sequence[str]) -> None:
    """What happens to connected nodes, many in one transaction (the state machine's entry).

    A node that is registering or back from offline/drained goes ``verifying`` when its CPU
    is not verified or a device is only claimed (the challenger takes it from there), else
    ``available``; one back from a long absence (``reverify_after_offline_s``) proves its
    verified devices again.
    """
    now = time.time()
    config = verification_service.ChallengerConfig.from_settings(state.settings)
    async with state.session() as session:
        nodes: list[Node] = []
        for chunk in chunks(node_ids):
            rows = await session.execute(
                select(Node).where(Node.id.in_(chunk), Node.state.in_(_ENTRY))
            )
            nodes.extend(rows.scalars())
        if not nodes:
            return
        by_node: dict[str, list[Device]] = defaultdict(list)
        for dev in await verification_service.present_devices(session, [n.id for n in nodes]):
            by_node[dev.node_id].append(dev)
        for node in nodes:
            current = NodeState(node.state)
            devices = by_node.get(node.id, [])
            gone_long = (
                current in (NodeState.OFFLINE, NodeState.DRAINED)
                and now - node.state_changed_at > config.reverify_after_offline_s
            )
            if gone_long:
                for dev in devices:
                    if dev.state == DeviceState.VERIFIED.value:
                        dev.state = DeviceState.CLAIMED.value
            reason = "registered" if current == NodeState.REGISTERING else "reconnected"
            if verification_service.needs_verification(node.id, devices):
                node_service.transition(
                    session, node, NodeState.VERIFYING, f"{reason}: hardware challenge", now
                )
            else:
                node_service.transition(session, node, NodeState.AVAILABLE, reason, now)
        await session.commit()


async def sync_members_many(state: CoordinatorState, node_ids: Sequence[str]) -> None:
    """Tell each (re)connected agent which members it should be running (it stops the
    rest): one query for all of them, then one ``member.sync`` per agent, in the background."""
    wanted: dict[str, list[str]] = {n: [] for n in node_ids}
    async with state.session() as session:
        for chunk in chunks(node_ids):
            rows = await session.execute(
                select(Member.node_id, Member.id).where(
                    Member.node_id.in_(chunk), Member.state.in_(cluster_service.LIVE_MEMBER)
                )
            )
            for node_id, member_id in rows:
                wanted[node_id].append(member_id)
    for node_id, members in wanted.items():
        if state.agents.reachable(node_id):
            state.track(asyncio.create_task(_sync(state, node_id, members)))


async def _sync(state: CoordinatorState, node_id: str, members: list[str]) -> None:
    try:
        await state.agents.member_sync(node_id, members)
    except (AgentNotConnected, CommandFailed) as exc:
        log.warning("member.sync with %s failed: %s", node_id, exc)


class ConnectBatch:
    """The coordinator's connect work (see the module doc); one per process."""

    def __init__(
        self,
        state: CoordinatorState,
        challenger: Challenger | None,
        *,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.state = state
        self.challenger = challenger
        self.coalescer = Coalescer(
            self._activate, after=self._follow_up, interval_s=interval_s, track=state.track
        )

    async def on_connect(self, node_id: str) -> None:
        """The hub's hook: returns once the node is activated (challenges and member.sync
        follow in the background)."""
        await self.coalescer.submit(node_id)

    async def _activate(self, node_ids: list[str]) -> None:
        try:
            await activate_many(self.state, node_ids)
        except Exception as exc:
            if len(node_ids) == 1:
                raise
            # E.g. a deadlock with another multi-row writer (the heartbeat flush) on
            # PostgreSQL: one small transaction per node cannot take part in one.
            log.warning("activating %d node(s) failed (%s): one by one", len(node_ids), exc)
            for node_id in node_ids:
                await _guarded(self._activate, [node_id])

    async def _follow_up(self, node_ids: list[str]) -> None:
        if self.challenger is not None:
            try:
                await self.challenger.on_connected(node_ids)
            except Exception:
                log.exception("challenger: connect batch of %d node(s) failed", len(node_ids))
        # The agents answer only once their receive loops run: they do, since the
        # handshakes returned when the activation above was done.
        await sync_members_many(self.state, node_ids)

    async def idle(self) -> None:
        await self.coalescer.idle()
