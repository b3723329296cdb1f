"""The cluster reconciler wakes across replicas (issue 11 §3) on a real nats-server.

Replica A writes a cluster row and wakes its reconcilers, as the API does after a create;
replica B is the one that works it (it holds the agents; A runs no reconciler here, which
stands for any replica that cannot take the cluster at that moment: its own reconciler
busy, the lease held by B). B's reconciler polls every 2 s, as in production. With the
wake on the bus (``loops.clusters.wire_wake``, signal ``clusters.wake``), B's first
``member.start`` reaches the head's agent within a fraction of a second; without it (B's
listener removed) it waits for B's next tick. Both are measured in the same run and the
medians printed (bench/RESULTS.md quotes them).

Skipped, with the reason, when no NATS server answers on 127.0.0.1:4222.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from loom.coordinator.bus import BUS_KEY
from loom.coordinator.config import Settings
from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.db.models import Cluster, Member, Node
from loom.coordinator.hub import AgentHub
from loom.coordinator.loops import clusters as cluster_loop
from loom.coordinator.replicas import sessions
from loom.coordinator.replicas.bus import CLUSTERS_WAKE
from loom.coordinator.replicas.replica import Replica
from loom.coordinator.state import CoordinatorState
from loom.protocol.messages import Ack
from support.nats import NATS_URL, needs_nats

pytestmark = needs_nats

POLL_S = 2.0
TRIALS = 7
NODE = "n-wake"


class HeadAgent:
    """The head's agent socket on B: acks ``member.start`` as a real agent does (its
    Ray node id and the head's addresses) and notes when each start arrived."""

    def __init__(self, hub: AgentHub) -> None:
        self.hub = hub
        self.started: dict[str, float] = {}

    async def send_text(self, data: str) -> None:
        frame = json.loads(data)
        result: dict[str, object] = {}
        if frame.get("name") == "member.start":
            member = str(frame["args"]["member_id"])
            self.started.setdefault(member, time.monotonic())
            result = {"ray_node_id": f"ray-{member}", "gcs_address": "10.0.0.1:6379"}
        ack = Ack(id=frame["id"], ok=True, result=result)
        asyncio.get_running_loop().call_soon(self.hub.get(NODE).resolve, ack)

    async def send_bytes(self, data: bytes) -> None:
        pass

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        pass


@dataclass
class Pair:
    a: CoordinatorState
    b: CoordinatorState
    replicas: tuple[Replica, Replica]
    agent: HeadAgent
    b_unwire: object


def _state(engine: object, db_url: str, name: str) -> tuple[CoordinatorState, Replica]:
    settings = Settings(
        db_url=db_url, bus_url=NATS_URL, replica_id=name, tune_gc=False,
        reconcile_interval_s=POLL_S,
    )  # fmt: skip
    state = CoordinatorState(settings=settings, engine=engine, sessions=session_factory(engine))  # type: ignore[arg-type]
    replica = Replica(
        bus_url=NATS_URL, replica_id=name, hub=state.hub, sessions_factory=state.sessions,
        heartbeat_timeout_s=15.0,
    )  # fmt: skip
    state.agents = replica.agents
    state.sessions.configure(info={BUS_KEY: replica.bus})  # as the app factory does
    return state, replica


@pytest.fixture
async def pair(db_url: str) -> AsyncIterator[Pair]:
    engine = create_engine(db_url)
    await migrate(engine)
    suffix = str(time.monotonic_ns())
    a, ra = _state(engine, db_url, f"wa-{suffix}")
    b, rb = _state(engine, db_url, f"wb-{suffix}")
    for replica in (ra, rb):
        await replica.start()
    now = time.time()
    async with b.session() as s:
        s.add(
            Node(
                id=NODE, node_key="e" * 64, owner_key="cd" * 32, name="box", region="eu-west",
                state="allocated", state_changed_at=now, registered_at=now,
            )
        )  # fmt: skip
        await s.commit()
        epoch = await sessions.claim(s, NODE, b.settings.replica_id, now)
        await s.commit()
    agent = HeadAgent(b.hub)
    await b.hub.attach(NODE, agent, now, epoch)
    cluster_loop.wire_wake(a, ra.bus)  # A's wakes go out (A runs no reconciler here)
    unwire = cluster_loop.spawn(b, cluster_loop.ClusterLoop(b), POLL_S)
    assert unwire is not None, "spawn wires the wake when the sessions carry a NATS bus"
    try:
        yield Pair(a, b, (ra, rb), agent, unwire)
    finally:
        await b.stop_loops()
        for replica in (ra, rb):
            await replica.close()
        await engine.dispose()


async def _create_through_a(pair: Pair, i: int) -> float:
    """A provisioning cluster with its head assigned on B's agent, written by A and
    woken as the API wakes; returns the seconds until its member.start reached the agent."""
    now = time.time()
    cid, mid = f"c-wake-{i}", f"m-wake-{i}"
    async with pair.a.session() as s:
        s.add(
            Cluster(
                id=cid, name=f"w{i}", owner_key="ab" * 32, state="provisioning", reason="placed",
                spec_json=json.dumps({"nodes": 1, "resources": {"cpus": 1}}), ray_token="t",
                head_address="", dashboard_url="", client_address="", hourly_micro=0,
                created_at=now, expires_at=now + 3600, state_changed_at=now, timings_json="{}",
            )
        )  # fmt: skip
        await s.flush()
        s.add(
            Member(
                id=mid, cluster_id=cid, node_id=NODE, role="head", state="assigned",
                model="cpu", units=1, price_micro=0, created_at=now,
            )
        )  # fmt: skip
        await s.commit()
    t0 = time.monotonic()
    pair.a.clusters_wake.set()
    deadline = t0 + 3 * POLL_S + 10
    while mid not in pair.agent.started:
        assert time.monotonic() < deadline, f"{cid} was not provisioned"
        await asyncio.sleep(0.005)
    latency = pair.agent.started[mid] - t0
    # Let B finish the cluster (running) before the next trial.
    while True:
        async with pair.b.session() as s:
            cluster = await s.get(Cluster, cid)
            assert cluster is not None
            if cluster.state == "running" and cluster.lock_owner is None:
                break
        assert time.monotonic() < deadline, f"{cid} did not reach running: {cluster.state}"
        await asyncio.sleep(0.02)
    return latency


async def test_a_cluster_written_by_one_replica_wakes_the_other_at_once(pair: Pair) -> None:
    rb = pair.replicas[1]
    rng = random.Random(11)  # creates arrive at random points of B's tick
    woken = []
    for i in range(TRIALS):
        await asyncio.sleep(rng.uniform(0, POLL_S))
        woken.append(await _create_through_a(pair, i))
    assert rb.bus.signals_received >= TRIALS
    # Before: B hears nothing and works the cluster on its next tick.
    pair.b_unwire()  # type: ignore[operator]
    polled = []
    for i in range(TRIALS, 2 * TRIALS):
        await asyncio.sleep(rng.uniform(0, POLL_S))
        polled.append(await _create_through_a(pair, i))
    with_wake, without = statistics.median(woken), statistics.median(polled)
    print(
        f"\ncreate on A -> member.start from B: with the bus wake median {with_wake * 1e3:.0f} ms "
        f"(max {max(woken) * 1e3:.0f}); polling every {POLL_S:g} s median "
        f"{without * 1e3:.0f} ms (max {max(polled) * 1e3:.0f}); {TRIALS} trials each"
    )
    assert with_wake < 0.5 * POLL_S and with_wake < without, (woken, polled)


async def test_a_wake_from_another_replica_does_not_echo(pair: Pair) -> None:
    """B hearing A's wake sets B's event without publishing again (no wake storm)."""
    rb = pair.replicas[1]
    sent_before = rb.link.nc.stats["out_msgs"]
    pair.a.clusters_wake.set()
    await asyncio.sleep(0.3)
    assert rb.bus.signals_received >= 1 and CLUSTERS_WAKE == "clusters.wake"
    assert rb.link.nc.stats["out_msgs"] == sent_before
