"""A standalone overlay authority for tests that drive Nebula members themselves: the
CA, the book in an isolated database, and the lighthouse of slot 0, supervised."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.overlay.authority import Authority, OverlaySettings
from loom.coordinator.overlay.book import Book
from loom.coordinator.overlay.lighthouse import Lighthouse
from support.db import isolated_db_async
from support.servers import free_port


@dataclass
class StandaloneOverlay:
    authority: Authority
    book: Book
    lighthouse: Lighthouse

    async def reload_lighthouse(self) -> bool:
        """The network's whole blocklist into the lighthouse (as a replica's step does)."""
        return await self.lighthouse.reload(await self.book.blocklist())


@contextlib.asynccontextmanager
async def standalone_overlay(
    tmp_path: Path, network: str, cert_lifetime_s: float | None = None, host: str = ""
) -> AsyncIterator[StandaloneOverlay]:
    """A lighthouse on 0.0.0.0:<free port>, advertised on loopback as ``loom up`` does
    (members reach it through their veth), or on ``host`` (listening and advertised
    there), signing into a fresh database's book."""
    udp = free_port()
    extra = {} if cert_lifetime_s is None else {"cert_lifetime_s": cert_lifetime_s}
    settings = OverlaySettings(
        listen=f"{host or '0.0.0.0'}:{udp}",
        advertise=f"{host or '127.0.0.1'}:{udp}",
        network=network,
        data_dir=tmp_path / "overlay",
        **extra,  # type: ignore[arg-type]
    )
    async with isolated_db_async(tmp_path) as url:
        engine = create_engine(url)
        await migrate(engine)
        try:
            authority = Authority(settings)
            book = Book(authority, session_factory(engine))
            await book.register_ca("test")
            slot = await book.claim_lighthouse(settings.advertised(), "test")
            lighthouse = Lighthouse(authority, slot.slot)
            await lighthouse.start()
            supervisor = asyncio.create_task(lighthouse.run())
            try:
                yield StandaloneOverlay(authority, book, lighthouse)
            finally:
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor
        finally:
            await engine.dispose()
