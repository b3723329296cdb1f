"""One claimed cluster: its lease, a clock, and guarded applies (used by the reconciler).

A step of the cluster reconciler (``loops/clusters.py``) works on a cluster only while it
holds the cluster row's lease (``loom.coordinator.leases``). Everything it writes goes
through :meth:`ClusterWork.apply`: a transaction that begins with the token guard (the row
stays locked until commit on PostgreSQL) and records the action in ``lease_audit``; if the
lease was taken over meanwhile (this replica stalled past expiry), the transaction is rolled
back and :class:`~loom.coordinator.leases.StaleLease` raised, so the step's result is
dropped and the new owner's work stands. Slow work between applies (an agent call of up to
90 s) is covered by the reconciler renewing the lease in the background.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator import leases
from loom.coordinator.db.models import Cluster
from loom.coordinator.state import CoordinatorState

CLUSTERS = cast(Table, Cluster.__table__)


@dataclass
class ClusterWork:
    state: CoordinatorState
    lease: leases.Lease
    #: The step's `now`; the work's clock runs on from it (so tests may inject any `now`).
    started_at: float
    ttl_s: float
    _mono0: float = field(default_factory=time.monotonic)

    @property
    def cluster_id(self) -> str:
        return self.lease.item_id

    def now(self) -> float:
        return self.started_at + (time.monotonic() - self._mono0)

    @contextlib.asynccontextmanager
    async def apply(self, action: str) -> AsyncIterator[AsyncSession]:
        """A guarded transaction: commits on exit, rolls back (and re-raises) on error."""
        async with self.state.session() as session:
            ok = await leases.guard(session, CLUSTERS, self.lease, action=action, now=self.now())
            if not ok:
                await session.rollback()
                raise leases.StaleLease(self.lease, f"apply {action!r} refused")
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise
            await session.commit()

    async def renew(self) -> None:
        async with self.state.session() as session:
            self.lease = await leases.renew(
                session, CLUSTERS, self.lease, now=self.now(), ttl_s=self.ttl_s
            )
            await session.commit()

    async def release(self) -> None:
        async with self.state.session() as session:
            await leases.release(session, CLUSTERS, self.lease)
            await session.commit()
