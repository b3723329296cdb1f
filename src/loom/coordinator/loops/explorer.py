"""The explorer's background work: a heartbeat-rate tracker (in memory, every second) and
the utilization sampler (one row a minute, for the 24 h chart).

With several replicas one of them samples: the one holding the ``explorer-sampler`` role
lease (``loom.coordinator.leases``); it claims (or keeps) the role and writes the sample in
one transaction, so a takeover never doubles a minute's row. The same step forgets
``lease_audit`` rows older than a week.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from sqlalchemy import func, select

from loom.coordinator import leases
from loom.coordinator.db.models import UtilizationSample
from loom.coordinator.metrics import CoordinatorMetrics
from loom.coordinator.services import explorer as service
from loom.coordinator.services.explorer_ledger import VerifyCache
from loom.coordinator.state import CoordinatorState

SAMPLE_INTERVAL_S = 60.0
RATE_INTERVAL_S = 1.0
ROLE = "explorer-sampler"
AUDIT_KEEP_S = 7 * 86400.0


@dataclass
class HeartbeatRate:
    """Heartbeats per second over the last `window_s`, from the hub's running total."""

    window_s: float = 10.0
    points: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=600))
    #: (unix seconds, rate) for the last ten minutes: the overview's sparkline
    history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=600))

    def observe(self, total: int, mono: float, wall: float) -> float:
        self.points.append((mono, total))
        while len(self.points) > 2 and mono - self.points[1][0] >= self.window_s:
            self.points.popleft()
        rate = self.rate()
        self.history.append((wall, rate))
        return rate

    def rate(self) -> float:
        if len(self.points) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class ExplorerState:
    metrics: CoordinatorMetrics = field(default_factory=CoordinatorMetrics)
    rate: HeartbeatRate = field(default_factory=HeartbeatRate)
    verify: VerifyCache = field(default_factory=VerifyCache)


async def sample_step(
    state: CoordinatorState,
    explorer: ExplorerState,
    now: float | None = None,
    interval_s: float = SAMPLE_INTERVAL_S,
) -> bool:
    """Write one utilization sample if this replica holds the sampler role (True if so)."""
    now = time.time() if now is None else now
    async with state.session() as session:
        lease = await leases.claim_role(
            session, ROLE, state.settings.replica_id, now, max(3 * interval_s, 10.0)
        )
        if lease is None:
            await session.commit()
            return False
        last = await session.scalar(select(func.max(UtilizationSample.at)))
        if last is not None and now - float(last) < interval_s / 2:
            await session.commit()  # just taken over from a sampler that already wrote it
            return False
        await service.record_sample(session, heartbeats_per_s=explorer.rate.rate(), now=now)
        leases.audit_role(session, lease, action="sample", item_id=f"{now:.0f}", now=now)
        await leases.purge_audit(session, now - AUDIT_KEEP_S)
        await session.commit()
        return True


def spawn(state: CoordinatorState, explorer: ExplorerState) -> None:
    """Start the explorer's loops (call from the app's lifespan)."""
    interval = float(state.settings.extra.get("explorer_sample_s", SAMPLE_INTERVAL_S))

    async def rate_step() -> None:
        explorer.rate.observe(state.hub.heartbeats.total, time.monotonic(), time.time())

    async def sample() -> None:
        await sample_step(state, explorer, interval_s=interval)

    state.spawn_loop("explorer-heartbeat-rate", RATE_INTERVAL_S, rate_step)
    state.spawn_loop("explorer-sampler", interval, sample)
