"""What a running coordinator holds: settings, database, the agent hub, background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loom.coordinator.config import Settings
from loom.coordinator.hub import AgentHub

log = logging.getLogger(__name__)


@dataclass
class CoordinatorState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    hub: AgentHub = field(default_factory=AgentHub)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started_at: float = 0.0

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

    async def stop_loops(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
