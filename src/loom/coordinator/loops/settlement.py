"""Settlement loop: meter healthy time, settle it to suppliers, stop clusters out of escrow.

A reconciler like the watchdog: each step reads the facts, decides, acts and records, one
cluster per DB transaction. Every money movement it makes is keyed by the metering state it
commits with, so a step that is killed half-way and re-run pays nothing twice.

Each cluster is isolated (`loops.isolation`): a cluster whose settlement fails (a poisoned
row) is logged, counted in ``loom_loop_item_errors_total{loop="settlement"}``, noted on
its timeline, and retried next tick, while every other cluster settles as usual.

With several replicas one of them settles: the step runs only while its replica holds the
``settlement`` role lease (``loom.coordinator.leases``), and every cluster's settlement is a
guarded apply of that lease (its transaction begins by locking the role row with our token;
a replica whose role was taken over has its settlement rolled back). Each settlement that
moved money is recorded in ``lease_audit``. A cluster out of escrow is not torn down here:
it is marked `terminating` and the cluster reconciler is woken.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from loom.coordinator import leases
from loom.coordinator.db.models import Cluster
from loom.coordinator.loops.isolation import isolated, on_cluster
from loom.coordinator.services import billing, market
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import ClusterState

log = logging.getLogger(__name__)

ROLE = "settlement"


@dataclass
class StepResult:
    settled_micro: int = 0
    transactions: int = 0
    refunded: list[str] = field(default_factory=list)
    exhausted: list[str] = field(default_factory=list)
    prices_changed: int = 0
    #: Another replica holds the settlement role: this one did nothing.
    skipped: bool = False
    #: Settlements dropped because the role was taken over mid-step.
    stale: int = 0


async def settlement_step(state: CoordinatorState) -> None:
    """One tick of the loop (spawned by the app every `settle_interval_s`)."""
    await run_settlement(state)


def role_ttl_s(state: CoordinatorState) -> float:
    """The settlement role lapses after three missed ticks (at least 30 s)."""
    return max(30.0, 3 * state.settings.settle_interval_s)


async def run_settlement(state: CoordinatorState, now: float | None = None) -> StepResult:
    """Refresh auto prices, meter and settle, refund leftovers, stop exhausted clusters."""
    settings = state.settings
    now = time.time() if now is None else now
    result = StepResult()
    async with state.session() as session:
        lease = await leases.claim_role(session, ROLE, settings.replica_id, now, role_ttl_s(state))
        await session.commit()
    if lease is None:
        result.skipped = True
        return result
    async with isolated("settlement", "auto-prices"), state.session() as session:
        if await leases.guard_role(
            session, lease, action="prices", item_id="-", now=now, record=False
        ):
            result.prices_changed = await market.refresh_auto_prices(session)
            await session.commit()
    async with state.session() as session:
        cluster_ids = await billing.clusters_to_meter(session)
    for cluster_id in cluster_ids:
        async with isolated(
            "settlement", cluster_id, record=on_cluster(state, "settlement", cluster_id)
        ):
            async with state.session() as session:
                if not await leases.guard_role(
                    session, lease, action="settle", item_id=cluster_id, now=now, record=False
                ):
                    await session.rollback()
                    result.stale += 1
                    return result
                report = await billing.meter_and_settle(
                    session, now, settings.fee_bps, [cluster_id]
                )
                if report.transactions:
                    leases.audit_role(
                        session, lease, action=f"settle@{now:.3f}", item_id=cluster_id, now=now
                    )
                await session.commit()
            result.settled_micro += report.settled_micro
            result.transactions += report.transactions
    async with state.session() as session:
        leftovers = await billing.ended_with_escrow(session)
    for cluster_id in leftovers:
        async with (
            isolated("settlement", cluster_id, record=on_cluster(state, "settlement", cluster_id)),
            state.session() as session,
        ):
            if not await leases.guard_role(
                session, lease, action="close", item_id=cluster_id, now=now, record=False
            ):
                result.stale += 1
                return result
            if await billing.close_cluster(session, cluster_id, now, settings.fee_bps):
                leases.audit_role(session, lease, action="close", item_id=cluster_id, now=now)
                result.refunded.append(cluster_id)
            await session.commit()
    async with isolated("settlement", "escrow-check"), state.session() as session:
        if await leases.guard_role(
            session, lease, action="escrow", item_id="-", now=now, record=False
        ):
            result.exhausted = await billing.exhausted_clusters(
                session, now, settings.escrow_warn_s
            )
            await session.commit()
    for cluster_id in result.exhausted:
        async with isolated("settlement", cluster_id):
            await stop_exhausted(state, cluster_id, now)
    return result


async def stop_exhausted(state: CoordinatorState, cluster_id: str, now: float) -> bool:
    """Mark a cluster out of escrow `terminating` (the reconciler tears it down)."""
    async with state.session() as session:
        cluster = await session.get(Cluster, cluster_id, with_for_update=True)
        if cluster is None or cluster.state not in billing.STOPPABLE_STATES:
            return False
        log.info("escrow of %s exhausted: tearing it down", cluster_id)
        cluster_service.transition(
            session, cluster, ClusterState.TERMINATING, "escrow exhausted", now
        )
        await session.commit()
    state.clusters_wake.set()
    return True
