"""Leased work items (loom.coordinator.leases) on a real database, two "replicas" racing.

Each replica has its own engine (its own connection pool, as two processes would) on the
same database. Steps take `now`; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import cast

import pytest
from sqlalchemy import Table, delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loom.coordinator import leases
from loom.coordinator.agent_client import AgentClient
from loom.coordinator.config import Settings
from loom.coordinator.db.engine import create_engine, is_sqlite, migrate, session_factory
from loom.coordinator.db.models import Cluster, LeaseAudit, Member, Node, UtilizationSample
from loom.coordinator.hub import AgentHub
from loom.coordinator.loops.cluster_work import ClusterWork
from loom.coordinator.loops.clusters import ClusterLoop
from loom.coordinator.loops.explorer import ExplorerState, sample_step
from loom.coordinator.loops.settlement import run_settlement
from loom.coordinator.loops.watchdog import LIVENESS, watchdog_step
from loom.coordinator.replicas import sessions as agent_sessions
from loom.coordinator.services import billing, ledger
from loom.coordinator.state import CoordinatorState
from loom.core import ledger as core
from loom.core.money import MICRO
from loom.core.spec import parse_spec
from loom.protocol.messages import Ack

T0 = 1_800_000_000.0
CLUSTERS = cast(Table, Cluster.__table__)


@pytest.fixture
async def engines(db_url: str) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    a, b = create_engine(db_url), create_engine(db_url)
    await migrate(a)
    try:
        yield a, b
    finally:
        await a.dispose()
        await b.dispose()


def _cluster(i: int, state: str = "requested") -> Cluster:
    return Cluster(
        id=f"c-{i:04d}",
        name=f"n{i}",
        owner_key="ab" * 32,
        state=state,
        reason="",
        spec_json="{}",
        ray_token="t",
        head_address="",
        dashboard_url="",
        client_address="",
        hourly_micro=0,
        created_at=T0,
        expires_at=T0 + 3600,
        state_changed_at=T0,
        timings_json="{}",
    )


async def _seed(sessions: async_sessionmaker[AsyncSession], n: int) -> None:
    async with sessions() as s:
        s.add_all(_cluster(i) for i in range(n))
        await s.commit()


async def _audit(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[str, str, str]]:
    async with sessions() as s:
        rows = await s.execute(select(LeaseAudit.item_id, LeaseAudit.action, LeaseAudit.owner))
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]


async def _replica_step(
    sessions: async_sessionmaker[AsyncSession], owner: str, now: float, *, batch: int
) -> int:
    """Claim due `requested` clusters, move each to `provisioning` under its lease."""
    async with sessions() as s:
        held = await leases.claim(
            s,
            CLUSTERS,
            owner=owner,
            now=now,
            ttl_s=30,
            where=CLUSTERS.c.state == "requested",
            limit=batch,
        )
        await s.commit()
    for lease in held:
        await asyncio.sleep(0)  # let the other replica interleave
        async with sessions() as s:
            ok = await leases.guard(
                s, CLUSTERS, lease, action="provision", now=now, values={"state": "provisioning"}
            )
            assert ok
            await leases.release(s, CLUSTERS, lease)
            await s.commit()
    return len(held)


async def test_two_replicas_racing_do_every_item_exactly_once(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    a, b = (session_factory(e) for e in engines)
    await _seed(a, 60)

    async def replica(sessions: async_sessionmaker[AsyncSession], owner: str) -> int:
        done = 0
        for _ in range(100):
            n = await _replica_step(sessions, owner, T0, batch=4)
            done += n
            if n == 0:
                async with sessions() as s:
                    left = await s.scalar(
                        select(Cluster.id).where(Cluster.state == "requested").limit(1)
                    )
                if left is None:
                    break
        return done

    done_a, done_b = await asyncio.gather(replica(a, "r-a"), replica(b, "r-b"))
    assert done_a + done_b == 60
    audit = await _audit(a)
    counts = Counter((item, action) for item, action, _ in audit)
    assert len(counts) == 60 and set(counts.values()) == {1}
    async with a() as s:
        states = set((await s.execute(select(Cluster.state))).scalars())
        assert states == {"provisioning"}


async def test_a_stale_token_applies_nothing_and_takeover_waits_for_expiry(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    a, b = (session_factory(e) for e in engines)
    await _seed(a, 1)
    async with a() as s:
        first = await leases.claim_one(s, CLUSTERS, "c-0000", owner="r-a", now=T0, ttl_s=30)
        await s.commit()
    assert first is not None
    async with b() as s:  # held and unexpired: nobody else gets it
        assert (
            await leases.claim_one(s, CLUSTERS, "c-0000", owner="r-b", now=T0 + 29, ttl_s=30)
            is None
        )
        await s.commit()
    async with a() as s:  # renewing pushes the expiry out
        first = await leases.renew(s, CLUSTERS, first, now=T0 + 20, ttl_s=30)
        await s.commit()
    async with b() as s:
        assert (
            await leases.claim_one(s, CLUSTERS, "c-0000", owner="r-b", now=T0 + 45, ttl_s=30)
            is None
        )
        second = await leases.claim_one(s, CLUSTERS, "c-0000", owner="r-b", now=T0 + 51, ttl_s=30)
        await s.commit()
    assert second is not None and second.token != first.token
    before = leases.stale_applies.get("clusters", 0)
    async with a() as s:  # r-a stalled past expiry: its result is dropped
        ok = await leases.guard(
            s, CLUSTERS, first, action="provision", now=T0 + 52, values={"state": "failed"}
        )
        assert not ok
        await s.rollback()
        with pytest.raises(leases.StaleLease):
            await leases.renew(s, CLUSTERS, first, now=T0 + 52, ttl_s=30)
        assert not await leases.release(s, CLUSTERS, first)
        await s.commit()
    assert leases.stale_applies["clusters"] == before + 2
    async with b() as s:
        assert await leases.guard(
            s, CLUSTERS, second, action="provision", now=T0 + 53, values={"state": "running"}
        )
        await s.commit()
    async with a() as s:
        cluster = await s.get(Cluster, "c-0000")
        assert cluster is not None and cluster.state == "running"
        assert cluster.lock_owner == "r-b"
    assert await _audit(a) == [("c-0000", "provision", "r-b")]


async def test_a_crashed_owners_item_is_resumed_after_expiry(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    a, b = (session_factory(e) for e in engines)
    await _seed(a, 3)
    async with a() as s:  # r-a claims everything, then "dies" (never applies, never renews)
        held = await leases.claim(s, CLUSTERS, owner="r-a", now=T0, ttl_s=30, limit=10)
        await s.commit()
    assert len(held) == 3
    assert await _replica_step(b, "r-b", T0 + 10, batch=10) == 0
    assert await _replica_step(b, "r-b", T0 + 31, batch=10) == 3
    assert sorted(i for i, _, o in await _audit(a) if o == "r-b") == ["c-0000", "c-0001", "c-0002"]


async def test_role_lease_one_holder_kept_while_renewed_taken_over_after_expiry(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    a, b = (session_factory(e) for e in engines)

    async def claim(
        sessions: async_sessionmaker[AsyncSession], owner: str, now: float
    ) -> leases.Lease | None:
        async with sessions() as s:
            lease = await leases.claim_role(s, "settler", owner, now, 10)
            await s.commit()
            return lease

    both = await asyncio.gather(claim(a, "r-a", T0), claim(b, "r-b", T0))
    holders = [lease for lease in both if lease is not None]
    assert len(holders) == 1
    holder = holders[0]
    other = b if holder.owner == "r-a" else a
    other_name = "r-b" if holder.owner == "r-a" else "r-a"
    mine = a if holder.owner == "r-a" else b
    again = await claim(mine, holder.owner, T0 + 5)  # the holder keeps its token
    assert again is not None and again.token == holder.token and again.expires_at == T0 + 15
    assert await claim(other, other_name, T0 + 12) is None
    async with mine() as s:
        assert await leases.guard_role(s, holder, action="settle", item_id="c-1", now=T0 + 13)
        await s.commit()
    taken = await claim(other, other_name, T0 + 16)
    assert taken is not None and taken.token != holder.token
    async with mine() as s:
        assert not await leases.guard_role(s, holder, action="settle", item_id="c-1", now=T0 + 17)
        await s.rollback()
        with pytest.raises(leases.StaleLease):
            await leases.renew_role(s, holder, now=T0 + 17, ttl_s=10)
    async with other() as s:
        taken = await leases.renew_role(s, taken, now=T0 + 20, ttl_s=10)
        assert await leases.release_role(s, taken)
        await s.commit()
    assert await claim(mine, holder.owner, T0 + 21) is not None  # released: free at once
    audit = await _audit(a)
    assert audit == [("c-1", "settle", holder.owner)]


# --------------------------------------------------------------- the cluster reconciler


def _replica(engine: AsyncEngine, db_url: str, name: str) -> CoordinatorState:
    settings = Settings(db_url=db_url, replica_id=name, cluster_lease_s=30.0, tune_gc=False)
    return CoordinatorState(settings=settings, engine=engine, sessions=session_factory(engine))


async def _seed_running(sessions: async_sessionmaker[AsyncSession], n: int) -> None:
    """`n` running clusters past their duration, each with a head on its own node (whose
    agent is not connected: stopping it is skipped, the rows still end)."""
    async with sessions() as s:
        for i in range(n):
            s.add(
                Node(
                    id=f"n-{i:04d}",
                    node_key=f"{i:064x}",
                    owner_key="cd" * 32,
                    name=f"box{i}",
                    region="eu-west",
                    state="allocated",
                    state_changed_at=T0,
                    registered_at=T0,
                )
            )
        await s.flush()
        for i in range(n):
            cluster = _cluster(i, state="running")
            cluster.expires_at = T0 + 60
            s.add(cluster)
        await s.flush()
        for i in range(n):
            s.add(
                Member(
                    id=f"m-{i:04d}",
                    cluster_id=f"c-{i:04d}",
                    node_id=f"n-{i:04d}",
                    role="head",
                    state="ready",
                    model="cpu",
                    units=1,
                    price_micro=0,
                    created_at=T0,
                    ready_at=T0,
                )
            )
        await s.commit()


@pytest.fixture
def replicas(
    engines: tuple[AsyncEngine, AsyncEngine], db_url: str
) -> tuple[CoordinatorState, CoordinatorState]:
    return _replica(engines[0], db_url, "r-a"), _replica(engines[1], db_url, "r-b")


async def test_two_reconcilers_racing_end_every_cluster_exactly_once(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = replicas
    await _seed_running(a.sessions, 16)
    loop_a, loop_b = ClusterLoop(a, batch=3), ClusterLoop(b, batch=3)
    claimed: list[str] = []
    for _ in range(10):
        got = await asyncio.gather(loop_a.run_once(T0 + 100), loop_b.run_once(T0 + 100))
        claimed += got[0] + got[1]
        if not got[0] and not got[1]:
            break
    async with a.sessions() as s:
        assert set((await s.execute(select(Cluster.state))).scalars()) == {"terminated"}
        assert set((await s.execute(select(Member.state))).scalars()) == {"released"}
        reasons = set((await s.execute(select(Cluster.reason))).scalars())
        assert reasons == {"duration expired"}
    audit = await _audit(a.sessions)
    counts = Counter((item, action) for item, action, _ in audit)
    for i in range(16):
        cid, mid = f"c-{i:04d}", f"m-{i:04d}"
        assert counts[(cid, "running:check")] == 1
        assert counts[(cid, f"member.released:{mid}")] == 1
        assert counts[(cid, "terminating->ended")] == 1
    owners = {owner for _, _, owner in audit}
    assert owners <= {"r-a", "r-b"}
    assert sorted(claimed) == [f"c-{i:04d}" for i in range(16)]  # each claimed once


async def test_reconciler_takes_a_dead_replicas_cluster_over_only_after_expiry(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = replicas
    await _seed_running(a.sessions, 1)
    async with a.sessions() as s:  # r-a claims it, then dies without working on it
        dead = await leases.claim_one(s, CLUSTERS, "c-0000", owner="r-a", now=T0 + 100, ttl_s=30)
        await s.commit()
    assert dead is not None
    loop_b = ClusterLoop(b)
    assert await loop_b.run_once(T0 + 120) == []
    assert await loop_b.run_once(T0 + 131) == ["c-0000"]
    async with b.sessions() as s:
        cluster = await s.get(Cluster, "c-0000")
        assert cluster is not None and cluster.state == "terminated"
        assert cluster.lock_owner is None  # released when done
    assert {o for _, _, o in await _audit(a.sessions)} == {"r-b"}


async def test_a_stalled_reconcilers_apply_is_dropped_after_takeover(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = replicas
    await _seed_running(a.sessions, 1)
    async with a.sessions() as s:
        held = await leases.claim_one(s, CLUSTERS, "c-0000", owner="r-a", now=T0, ttl_s=30)
        await s.commit()
    assert held is not None
    stalled = ClusterWork(a, held, started_at=T0, ttl_s=30)
    assert await ClusterLoop(b).run_once(T0 + 100) == ["c-0000"]  # r-b: expired, taken over
    with pytest.raises(leases.StaleLease):
        async with stalled.apply("running:check") as s:
            cluster = await s.get(Cluster, "c-0000")
            assert cluster is not None
            cluster.reason = "written by a stale replica"
    with pytest.raises(leases.StaleLease):
        await stalled.renew()
    async with a.sessions() as s:
        cluster = await s.get(Cluster, "c-0000")
        assert cluster is not None and cluster.state == "terminated"
        assert cluster.reason == "duration expired"


async def test_restart_frees_its_own_leases(
    replicas: tuple[CoordinatorState, CoordinatorState], db_url: str
) -> None:
    a, _b = replicas
    await _seed_running(a.sessions, 2)
    async with a.sessions() as s:
        assert await leases.claim_one(s, CLUSTERS, "c-0000", owner="r-a", now=T0, ttl_s=30)
        assert await leases.claim_one(s, CLUSTERS, "c-0001", owner="r-b", now=T0, ttl_s=30)
        assert await leases.claim_role(s, "settlement", "r-a", T0, 30)
        await s.commit()
    freed = await ClusterLoop(a).recover()  # r-a restarted under the same replica id
    async with a.sessions() as s:
        rows = await s.execute(select(Cluster.id, Cluster.lock_owner))
        owners = {str(r[0]): r[1] for r in rows}
    if is_sqlite(db_url):  # the only process: everything left leased is freed
        assert freed == 3 and owners == {"c-0000": None, "c-0001": None}
    else:
        assert freed == 2 and owners == {"c-0000": None, "c-0001": "r-b"}


async def test_only_the_settlement_role_holder_settles(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = replicas
    results = await asyncio.gather(run_settlement(a, T0), run_settlement(b, T0))
    assert sorted(r.skipped for r in results) == [False, True]
    again = await asyncio.gather(run_settlement(a, T0 + 30), run_settlement(b, T0 + 30))
    assert [r.skipped for r in again] == [r.skipped for r in results]  # the holder keeps it


class RecordingAgents(AgentClient):
    """Every agent reachable; ``member.start`` acked like a real agent's (a Ray node id and,
    for the head, its addresses). Only the transport is replaced: commands are the typed
    models, encoded and parsed as on the wire."""

    def __init__(self) -> None:
        super().__init__(AgentHub())
        self.calls: list[tuple[str, str, dict[str, object]]] = []

    def reachable(self, node_id: str) -> bool:
        return True

    async def _send(self, node_id: str, name: str, args_json: str, timeout: float) -> Ack:
        args = json.loads(args_json)
        self.calls.append((node_id, name, args))
        if name == "member.start":
            result = {"ray_node_id": f"ray-{args['member_id']}"}
            if args["role"] == "head":
                result["gcs_address"] = "10.0.0.1:6379"
            return Ack(id="x", ok=True, result=result)
        return Ack(id="x", ok=False, error="not answered in this test")


async def test_a_dead_replicas_provisioning_is_resumed_without_starting_a_member_twice(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = replicas
    agents = RecordingAgents()
    b.agents = agents
    await _seed_running(a.sessions, 3)  # three nodes; the cluster below uses them all
    async with a.sessions() as s:
        await s.execute(delete(Member))
        await s.execute(delete(Cluster))
        cluster = _cluster(100, state="provisioning")
        cluster.spec_json = json.dumps({"nodes": 3, "resources": {"cpus": 1}})
        cluster.head_address = "10.0.0.1:6379"
        s.add(cluster)
        await s.flush()
        # r-a started the head (ready), asked n-0001 (starting), then died.
        for i, (role, mstate) in enumerate(
            [("head", "ready"), ("worker", "starting"), ("worker", "assigned")]
        ):
            s.add(
                Member(
                    id=f"m-{i:04d}",
                    cluster_id="c-0100",
                    node_id=f"n-{i:04d}",
                    role=role,
                    state=mstate,
                    model="cpu",
                    units=1,
                    price_micro=0,
                    created_at=T0,
                    ready_at=T0 if mstate == "ready" else None,
                )
            )
        await s.commit()
    async with a.sessions() as s:
        assert await leases.claim_one(s, CLUSTERS, "c-0100", owner="r-a", now=T0, ttl_s=30)
        await s.commit()
    loop_b = ClusterLoop(b)
    try:
        assert await loop_b.run_once(T0 + 10) == []  # r-a's lease holds until it expires
        assert await loop_b.run_once(T0 + 31) == ["c-0100"]
    finally:
        await b.stop_loops()
    started = sorted(
        str(args["member_id"]) for _, name, args in agents.calls if name == "member.start"
    )
    assert started == ["m-0001", "m-0002"]  # the head, already ready, is not started again
    async with b.sessions() as s:
        ended = await s.get(Cluster, "c-0100")
        assert ended is not None
        assert ended.state == "running", ended.reason
        states = dict((await s.execute(select(Member.id, Member.state))).all())
        assert states == {"m-0000": "ready", "m-0001": "ready", "m-0002": "ready"}
    counts = Counter((item, action) for item, action, _ in await _audit(b.sessions))
    assert counts[("c-0100", "member.ready:m-0001")] == 1
    assert counts[("c-0100", "member.ready:m-0002")] == 1
    assert counts[("c-0100", "provisioning->running")] == 1
    assert ("c-0100", "member.ready:m-0000") not in counts


async def test_one_utilization_sample_a_minute_whichever_replicas_sample(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = replicas
    ea, eb = ExplorerState(), ExplorerState()
    first = await asyncio.gather(sample_step(a, ea, T0), sample_step(b, eb, T0))
    assert sorted(first) == [False, True]
    holder, other = (a, b) if first[0] else (b, a)
    assert await sample_step(holder, ea, T0 + 60)
    assert not await sample_step(other, eb, T0 + 120)  # the holder's role lasts 180 s
    # The holder dies: after its role expired the other replica samples, once a minute.
    assert await sample_step(other, eb, T0 + 241)
    assert not await sample_step(other, eb, T0 + 250)
    async with a.sessions() as s:
        ats = sorted((await s.execute(select(UtilizationSample.at))).scalars())
    assert ats == [T0, T0 + 60, T0 + 241]


async def test_one_watchdog_judges_and_takes_each_silent_node_offline_once(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    a, b = replicas
    await _seed_running(a.sessions, 4)
    async with a.sessions() as s:
        await s.execute(update(Node).values(state="available", last_heartbeat_at=T0))
        await s.commit()
    now = T0 + 100  # every node silent for 100 s (timeout 15 s)
    went = await asyncio.gather(watchdog_step(a, now), watchdog_step(b, now))
    assert sorted(len(w) for w in went) == [0, 4]
    async with a.sessions() as s:
        assert set((await s.execute(select(Node.state))).scalars()) == {"offline"}
    audit = await _audit(a.sessions)
    assert sorted(item for item, action, _ in audit if action.startswith("offline@")) == [
        f"n-{i:04d}" for i in range(4)
    ]


async def test_each_replica_judges_its_own_agents_and_none_judges_a_live_replicas(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    """The judge never takes offline an agent a *live* replica holds (its flush may only
    lag: 59-271 live agents were closed that way in a two-replica bench); that replica
    judges it itself, from memory; once the replica is gone, the judge does, after grace."""
    a, b = replicas
    await _seed_running(a.sessions, 3)
    async with a.sessions() as s:
        await s.execute(update(Node).values(state="available", last_heartbeat_at=T0))
        for i, holder in enumerate(("r-a", "r-b", "r-b")):
            await agent_sessions.claim(s, f"n-{i:04d}", holder, T0)
        await s.commit()
    # r-b heard from n-0002 a moment ago (its flush is behind): only n-0001 is silent to it.
    b.hub.heartbeats.record("n-0002", T0 + 99, "{}")
    now = T0 + 100  # the database says: every node silent for 100 s (timeout 15 s)
    # Both replicas are alive: each renewed its liveness at its last step, a second ago.
    async with a.sessions() as s:
        for r in ("r-a", "r-b"):
            assert await leases.claim_role(s, LIVENESS + r, r, now - 1, 10.0) is not None
        await s.commit()
    went = await asyncio.gather(watchdog_step(a, now), watchdog_step(b, now))
    # Whichever holds the judge's role, each takes only its own silent agent offline.
    assert went == [["n-0000"], ["n-0001"]], went
    async with a.sessions() as s:
        states = {i: st for i, st in (await s.execute(select(Node.id, Node.state))).all()}
    assert states == {"n-0000": "offline", "n-0001": "offline", "n-0002": "available"}
    # r-b dies (its steps stop). While its liveness lasts, nobody judges its agent...
    assert await watchdog_step(a, now + 5) == []
    # ... then the judge does, once the per-session grace since the last sign has passed.
    later = now + 200
    assert await watchdog_step(a, later) == ["n-0002"]
    audit = await _audit(a.sessions)
    offline = Counter(item for item, action, _ in audit if action.startswith("offline@"))
    assert offline == {"n-0000": 1, "n-0001": 1, "n-0002": 1}


async def test_two_settlers_racing_pay_each_period_once(
    replicas: tuple[CoordinatorState, CoordinatorState],
) -> None:
    """Both replicas tick settlement at the same moments; only the role holder settles,
    the supplier is paid exactly what one settler pays, and the ledger verifies."""
    a, b = replicas
    user, supplier = "ab" * 32, "cd" * 32
    spec = parse_spec({"resources": {"cpus": 1}, "duration": "1h"})
    async with a.sessions() as s:
        await ledger.post(s, core.DEPOSIT, "d1", core.deposit_entries(user, 10 * MICRO), {}, T0)
        await s.commit()
    await _seed_running(a.sessions, 3)
    async with a.sessions() as s:
        await s.execute(
            update(Member).values(price_micro=360_000, confirmed_s=0.0, confirmed_last=T0)
        )
        for cluster in (await s.execute(select(Cluster))).scalars():
            cluster.expires_at = T0 + 3600
            cluster.owner_key = user
            cluster.spec_json = json.dumps(spec.model_dump(mode="json"))
            await billing.hold_for_cluster(s, cluster, spec, T0)
        await s.commit()
    for tick in (100.0, 200.0):
        async with a.sessions() as s:
            await s.execute(update(Member).values(confirmed_s=tick, confirmed_last=T0 + tick))
            await s.commit()
        results = await asyncio.gather(run_settlement(a, T0 + tick), run_settlement(b, T0 + tick))
        assert sorted(r.skipped for r in results) == [False, True]
    async with a.sessions() as s:
        earned = await ledger.balance(s, core.earnings_account(supplier))
        verified = await ledger.verify(s)
    # 3 members x 200 s at 0.36/h = 3 x 20,000 micro, 5 % fee taken.
    assert earned == 3 * 19_000
    assert verified.ok, verified.failure
    audit = await _audit(a.sessions)
    settles = Counter((item, action) for item, action, _ in audit if action.startswith("settle@"))
    assert len(settles) == 6 and set(settles.values()) == {1}
