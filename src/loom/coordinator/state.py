"""What a running coordinator holds: settings, database, the agent hub, background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loom.coordinator.agent_client import AgentClient
from loom.coordinator.config import Settings
from loom.coordinator.hub import AgentHub
from loom.coordinator.placement_index import PlacementIndex
from loom.coordinator.services.ledger_sequencer import Sequencer

log = logging.getLogger(__name__)


class Wake(asyncio.Event):
    """An :class:`asyncio.Event` that also tells ``hooks`` when it is set here.

    ``set()`` is a wake-up raised by this process (the API wrote a row, healing marked a
    member lost): the hooks pass it on (with replicas, to the other replicas' reconcilers
    over the bus). ``wake()`` is a wake-up heard from elsewhere: it sets the event only,
    so a wake never echoes back.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hooks: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        for hook in list(self.hooks):
            try:
                hook()
            except Exception:  # a broken hook must not break the API request that woke us
                log.exception("wake hook failed")

    def wake(self) -> None:
        super().set()


@dataclass
class CoordinatorState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    hub: AgentHub = field(default_factory=AgentHub)
    #: Typed commands to agents (over ``hub``; a replica may route them elsewhere).
    agents: AgentClient = field(init=False)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    #: Set to wake the cluster reconciler (loops/clusters.py) at once: the API after it
    #: wrote a cluster row, healing after it marked a member lost; with replicas its wakes
    #: reach the other replicas' reconcilers over the bus (``loops.clusters.wire_wake``).
    clusters_wake: Wake = field(default_factory=Wake)
    #: One heartbeat flush at a time (the flusher loop and the watchdog both flush).
    flush_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started_at: float = 0.0
    #: The long-lived placement index (``placement_index``), set up by the app factory.
    placement: PlacementIndex | None = None
    #: The ledger's sequencer (``services.ledger_sequencer``), set up by the app factory.
    ledger: Sequencer | None = None

    def __post_init__(self) -> None:
        self.agents = AgentClient(self.hub)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    def spawn_loop(self, name: str, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` every `interval_s` until shutdown; a failing step is logged, not fatal."""

        async def runner() -> None:
            while True:
                try:
                    await step()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("loop %s: step failed", name)
                await asyncio.sleep(interval_s)

        self.tasks.append(asyncio.create_task(runner(), name=name))

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a reference to background work (a cluster's step, a sync) until it ends."""
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop_loops(self) -> None:
        everything = [*self.tasks, *self.background]
        for task in everything:
            task.cancel()
        for task in everything:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
