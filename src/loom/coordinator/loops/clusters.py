"""The cluster reconciler: the one owner of every cluster's life.

    requested → provisioning → running ⇄ healing → terminating → terminated | failed

The API only writes rows (create: placed and reserved, `provisioning`; delete:
`terminating`) and wakes this loop (``CoordinatorState.clusters_wake``); agent reports and
the watchdog only mark members lost and move a cluster to `healing` (a worker) or
`terminating` with a ``fail_reason`` (the head), then wake it too. Everything else — starting
members, replacing lost ones, expiry, teardown, settlement at the end — happens here, one
step function per state, each taking `now`.

Each tick claims due clusters (``leases.claim``: `FOR UPDATE SKIP LOCKED` on PostgreSQL), so
with several replicas each cluster is worked by exactly one of them at a time. A claimed
cluster is worked in the background: its step runs (and the next state's step, if the
state moved on: provisioning → running → …), the lease (``Settings.cluster_lease_s``) is
renewed every third of it while it runs, and released at the end. Every write is a
guarded apply (``ClusterWork.apply``); a replica that stalled past its lease's expiry has
its results dropped, and the replica that took over resumes from the durable progress in
the member rows (a member already `ready` is not started again; one left `starting` is
asked again, which the agent treats as a no-op).

With replicas a wake crosses the bus (``wire_wake``): the replica that wrote the row tells
the others' reconcilers (signal ``clusters.wake`` on ``loom.events.clusters.wake``), so a
cluster whose lease another replica holds or can claim is taken up at once, not on that
replica's next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import ColumnElement, Table, and_, or_, select

from loom.coordinator import leases
from loom.coordinator.bus import BUS_KEY
from loom.coordinator.db.engine import is_sqlite
from loom.coordinator.db.models import Cluster, Device
from loom.coordinator.loops import cluster_heal, cluster_provision
from loom.coordinator.loops.cluster_work import CLUSTERS, ClusterWork
from loom.coordinator.loops.isolation import isolated
from loom.coordinator.metrics import count_loop_item_error
from loom.coordinator.replicas.bus import CLUSTERS_WAKE, NatsBus
from loom.coordinator.services import clusters as cluster_service
from loom.coordinator.state import CoordinatorState
from loom.core.models import ClusterState

log = logging.getLogger(__name__)

DEVICES = cast(Table, Device.__table__)

#: A degraded cluster (short of nodes) looks for replacements again after this long.
DEGRADED_RETRY_S = 10.0
#: How many state steps one claim may run in a row (provisioning → running → …).
MAX_STEPS_PER_CLAIM = 4
#: The most clusters one tick claims.
CLAIM_BATCH = 50

Step = Callable[[ClusterWork, float], Awaitable[None]]


async def step_requested(work: ClusterWork, now: float) -> None:
    """A `requested` row is normally placed and moved on within its create request; one
    left behind (its request died before reserving) has nothing reserved: it fails."""
    async with work.apply("requested->failed") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        if cluster is None or cluster.state != ClusterState.REQUESTED.value:
            return
        if await cluster_service.members_of(session, work.cluster_id):
            cluster_service.transition(
                session, cluster, ClusterState.PROVISIONING, "placed", work.now()
            )
        else:
            cluster_service.transition(
                session,
                cluster,
                ClusterState.FAILED,
                "the create request ended before the cluster was placed; create it again",
                work.now(),
            )


async def step_provisioning(work: ClusterWork, now: float) -> None:
    await cluster_provision.provision(work)


async def step_running(work: ClusterWork, now: float) -> None:
    """Expire a cluster past its duration; send a degraded one back to healing."""
    async with work.apply("running:check") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        if cluster is None or cluster.state != ClusterState.RUNNING.value:
            return
        if cluster.expires_at <= now:
            cluster_service.transition(
                session, cluster, ClusterState.TERMINATING, "duration expired", work.now()
            )
        elif (
            cluster.reason.startswith("degraded")
            and now - cluster.state_changed_at >= DEGRADED_RETRY_S
        ):
            cluster_service.transition(
                session, cluster, ClusterState.HEALING, "retrying degraded", work.now()
            )


async def step_healing(work: ClusterWork, now: float) -> None:
    async with work.apply("healing:check") as session:
        cluster = await session.get(Cluster, work.cluster_id)
        expired = cluster is not None and cluster.expires_at <= now
        if cluster is not None and expired and cluster.state == ClusterState.HEALING.value:
            cluster_service.transition(
                session, cluster, ClusterState.TERMINATING, "duration expired", work.now()
            )
    if not expired:
        await cluster_heal.heal(work)


async def step_terminating(work: ClusterWork, now: float) -> None:
    await cluster_provision.teardown(work)


STEPS: dict[str, Step] = {
    ClusterState.REQUESTED.value: step_requested,
    ClusterState.PROVISIONING.value: step_provisioning,
    ClusterState.RUNNING.value: step_running,
    ClusterState.HEALING.value: step_healing,
    ClusterState.TERMINATING.value: step_terminating,
}


def due(now: float) -> ColumnElement[bool]:
    """The clusters with work to do at `now` (the claim's filter)."""
    c = CLUSTERS.c
    return or_(
        c.state.in_(
            (
                ClusterState.REQUESTED.value,
                ClusterState.PROVISIONING.value,
                ClusterState.HEALING.value,
                ClusterState.TERMINATING.value,
            )
        ),
        and_(
            c.state == ClusterState.RUNNING.value,
            or_(
                c.expires_at <= now,
                and_(c.reason.like("degraded%"), c.state_changed_at <= now - DEGRADED_RETRY_S),
            ),
        ),
    )


@dataclass
class ClusterLoop:
    """The cluster reconciler of one replica."""

    state: CoordinatorState
    batch: int = CLAIM_BATCH
    #: Clusters this replica is working on now, and their tasks.
    working: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.state.settings.replica_id

    @property
    def ttl_s(self) -> float:
        return self.state.settings.cluster_lease_s

    async def recover(self) -> int:
        """At start-up: free what a previous process of ours left leased (SQLite: every
        lease, the embedded coordinator being the only process), so it resumes at once."""
        sqlite = is_sqlite(self.state.settings.db_url)
        async with self.state.session() as session:
            freed = await leases.release_owned(
                session, [CLUSTERS, DEVICES], None if sqlite else self.owner
            )
            await session.commit()
        if freed:
            log.info("freed %d lease(s) left by a previous coordinator process", freed)
        return freed

    async def step(self, now: float | None = None) -> list[str]:
        """Claim the due clusters and start working on each; returns the ids claimed."""
        now = time.time() if now is None else now
        async with self.state.session() as session:
            claimed = await leases.claim(
                session,
                CLUSTERS,
                owner=self.owner,
                now=now,
                ttl_s=self.ttl_s,
                where=due(now),
                limit=self.batch,
                order_by=CLUSTERS.c.state_changed_at,
            )
            await session.commit()
        for lease in claimed:
            if lease.item_id in self.working:  # cannot happen while we renew; be safe
                continue
            work = ClusterWork(self.state, lease, started_at=now, ttl_s=self.ttl_s)
            task = asyncio.create_task(self._work(work, now), name=f"cluster-{lease.item_id}")
            self.working[lease.item_id] = task
            task.add_done_callback(self._forget(lease.item_id))
            self.state.track(task)
        return [lease.item_id for lease in claimed]

    def _forget(self, cluster_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            if self.working.get(cluster_id) is task:
                del self.working[cluster_id]

        return done

    async def settle(self, timeout: float = 300.0) -> None:
        """Wait until every cluster claimed so far is done (tests drive steps with this)."""
        tasks = list(self.working.values())
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)

    async def run_once(self, now: float | None = None) -> list[str]:
        """One tick, waiting for its work to finish."""
        claimed = await self.step(now)
        await self.settle()
        return claimed

    async def _work(self, work: ClusterWork, now: float) -> None:
        cluster_id = work.cluster_id
        lost = asyncio.Event()
        renewer = asyncio.create_task(self._keep_renewed(work, asyncio.current_task(), lost))
        try:
            async with isolated("clusters", cluster_id):
                for _ in range(MAX_STEPS_PER_CLAIM):
                    before = await self._state_of(cluster_id)
                    step = STEPS.get(before or "")
                    if step is None:
                        break
                    await step(work, work.now())
                    if await self._state_of(cluster_id) == before:
                        break
        except leases.StaleLease as exc:
            log.warning("cluster %s: %s; the replica that took it over goes on", cluster_id, exc)
            count_loop_item_error("clusters-stale")
        except asyncio.CancelledError:
            if not lost.is_set():
                raise
            log.warning("cluster %s: its lease was taken over while working; stopped", cluster_id)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewer
            with contextlib.suppress(Exception):
                await work.release()

    async def _keep_renewed(
        self, work: ClusterWork, task: asyncio.Task[None] | None, lost: asyncio.Event
    ) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await work.renew()
            except leases.StaleLease:
                lost.set()
                if task is not None:
                    task.cancel()
                return
            except Exception:  # a database hiccup: try again; expiry is ttl away
                log.exception("renewing the lease on %s failed", work.cluster_id)

    async def _state_of(self, cluster_id: str) -> str | None:
        async with self.state.session() as session:
            value = await session.scalar(select(Cluster.state).where(Cluster.id == cluster_id))
            return None if value is None else str(value)


async def wait_ended(
    state: CoordinatorState, cluster_id: str, *, timeout: float, poll_s: float = 0.1
) -> str:
    """Wait (bounded) until the cluster is terminated or failed; returns its state then."""
    deadline = time.monotonic() + timeout
    while True:
        async with state.session() as session:
            value = await session.scalar(select(Cluster.state).where(Cluster.id == cluster_id))
        current = "" if value is None else str(value)
        if current in (ClusterState.TERMINATED.value, ClusterState.FAILED.value, ""):
            return current
        if time.monotonic() >= deadline:
            return current
        await asyncio.sleep(poll_s)


def wire_wake(state: CoordinatorState, bus: NatsBus) -> Callable[[], None]:
    """Pass this replica's wakes to the other replicas' reconcilers and theirs to ours;
    returns the function that undoes it."""

    def tell() -> None:
        bus.signal(CLUSTERS_WAKE)

    state.clusters_wake.hooks.append(tell)
    stop_hearing = bus.on_signal(CLUSTERS_WAKE, state.clusters_wake.wake)

    def unwire() -> None:
        with contextlib.suppress(ValueError):
            state.clusters_wake.hooks.remove(tell)
        with contextlib.suppress(ValueError):
            stop_hearing()

    return unwire


def replica_bus(state: CoordinatorState) -> NatsBus | None:
    """The NATS bus the app factory configured the session factory with, if replicated."""
    info = state.sessions.kw.get("info") or {}
    bus = info.get(BUS_KEY)
    return bus if isinstance(bus, NatsBus) else None


def spawn(
    state: CoordinatorState, loop: ClusterLoop, interval_s: float
) -> Callable[[], None] | None:
    """Run the reconciler: a tick every `interval_s`, or at once when woken (with
    replicas, by any replica: ``wire_wake``, whose undo is returned)."""
    bus = replica_bus(state)
    unwire = wire_wake(state, bus) if bus is not None else None

    async def runner() -> None:
        while True:
            try:
                await loop.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("loop clusters: step failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.clusters_wake.wait(), interval_s)
            state.clusters_wake.clear()

    state.tasks.append(asyncio.create_task(runner(), name="clusters"))
    return unwire
