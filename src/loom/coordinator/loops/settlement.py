"""Settlement loop: meter healthy time, settle it to suppliers, stop clusters out of escrow.

A reconciler like the watchdog: each step reads the facts, decides, acts and records, one
cluster per DB transaction. Every money movement it makes is keyed by the metering state it
commits with, so a step that is killed half-way and re-run pays nothing twice.

Each cluster is isolated (`loops.isolation`): a cluster whose settlement fails (a poisoned
row) is logged, counted in ``loom_loop_item_errors_total{loop="settlement"}``, noted on
its timeline, and retried next tick, while every other cluster settles as usual.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from loom.coordinator import provisioner
from loom.coordinator.loops.isolation import isolated, on_cluster
from loom.coordinator.services import billing, market
from loom.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    settled_micro: int = 0
    transactions: int = 0
    refunded: list[str] = field(default_factory=list)
    exhausted: list[str] = field(default_factory=list)
    prices_changed: int = 0


async def settlement_step(state: CoordinatorState) -> None:
    """One tick of the loop (spawned by the app every `settle_interval_s`)."""
    await run_settlement(state)


async def run_settlement(state: CoordinatorState, now: float | None = None) -> StepResult:
    """Refresh auto prices, meter and settle, refund leftovers, stop exhausted clusters."""
    settings = state.settings
    now = time.time() if now is None else now
    result = StepResult()
    async with isolated("settlement", "auto-prices"), state.session() as session:
        result.prices_changed = await market.refresh_auto_prices(session)
        await session.commit()
    async with state.session() as session:
        cluster_ids = await billing.clusters_to_meter(session)
    for cluster_id in cluster_ids:
        async with isolated(
            "settlement", cluster_id, record=on_cluster(state, "settlement", cluster_id)
        ):
            async with state.session() as session:
                report = await billing.meter_and_settle(
                    session, now, settings.fee_bps, [cluster_id]
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
            if await billing.close_cluster(session, cluster_id, now, settings.fee_bps):
                result.refunded.append(cluster_id)
            await session.commit()
    async with isolated("settlement", "escrow-check"), state.session() as session:
        result.exhausted = await billing.exhausted_clusters(session, now, settings.escrow_warn_s)
        await session.commit()
    for cluster_id in result.exhausted:
        if cluster_id in state.driving:
            continue  # being provisioned, healed or torn down: next step decides again
        log.info("escrow of %s exhausted: tearing it down", cluster_id)
        state.drive(cluster_id, provisioner.teardown(state, cluster_id, reason="escrow exhausted"))
    return result
