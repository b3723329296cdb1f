"""Three coordinator replicas on one PostgreSQL and NATS (issue 11 §3, §4, §7).

Agents sit on replicas B and C; a cluster created through replica A forms (A's member
commands travel to B and C over NATS) and runs a Ray job. Mid-job the replica holding the
head's agent is SIGKILLed: its agents reconnect to another replica within seconds (the
time is printed), the cluster stays ``running``, the job finishes, no member is started
twice, nothing is settled twice, the ledger verifies and credit is conserved exactly.

Needs PostgreSQL (``LOOM_TEST_DB`` or the default test database) and NATS on
127.0.0.1:4222; skipped with the reason when either is missing.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from loom.client.forward import open_tunnel
from loom.client.sdk import LoomClient, LoomConnectionError
from loom.protocol.events import ChangeCause, NodeChanged
from loom.protocol.identity import KeyPair
from support.db import DEFAULT_PG, backend, is_postgres
from support.servers import AgentProcess, CoordinatorProcess, free_port, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="bubblewrap not installed (make sysdeps)"
    ),
]

NATS = "nats://127.0.0.1:4222"
#: Replicas run the overlay where members can join it (root, Nebula, nftables: CI).
OVERLAY = os.geteuid() == 0 and all(shutil.which(b) for b in ("nebula", "nft"))
PG = backend() if is_postgres() else DEFAULT_PG
DEPOSIT = "500"

JOB = textwrap.dedent(
    """
    import sys, time
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0.1)
    def work(seconds):
        time.sleep(seconds)
        return ray.get_runtime_context().get_node_id()

    ray.init(address=sys.argv[1])
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print(f"JOB-STARTED on {len(alive)} nodes", flush=True)
    refs = [
        work.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
            float(sys.argv[3])
        )
        for n in alive
    ]
    seen = set(ray.get(refs, timeout=300))
    print(f"JOB-DONE on {len(seen)} nodes", flush=True)
    sys.exit(0 if len(seen) == int(sys.argv[2]) else 1)
    """
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


async def _pg(sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(PG)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not _reachable("127.0.0.1", 5432):
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    if not _reachable("127.0.0.1", 4222):
        pytest.skip("no NATS server on 127.0.0.1:4222 (start nats-server)")
    schema = f"t_{secrets.token_hex(6)}"
    asyncio.run(_pg(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG}{'&' if '?' in PG else '?'}schema={schema}"
    finally:
        asyncio.run(_pg(f'DROP SCHEMA "{schema}" CASCADE'))


def _holders(url: str) -> dict[str, tuple[str, int]]:
    schema = url.rsplit("schema=", 1)[1]
    rows = asyncio.run(_pg(f'SELECT node_id, replica_id, epoch FROM "{schema}".agent_sessions'))
    return {r["node_id"]: (r["replica_id"], int(r["epoch"])) for r in rows}


def _members(url: str, cluster_id: str) -> list[Any]:
    schema = url.rsplit("schema=", 1)[1]
    return asyncio.run(
        _pg(f'SELECT id, node_id, state FROM "{schema}".members WHERE cluster_id = $1', cluster_id)
    )


def _meters(url: str) -> dict[str, int]:
    schema = url.rsplit("schema=", 1)[1]
    rows = asyncio.run(_pg(f'SELECT member_id, settled_micro FROM "{schema}".member_meters'))
    return {r["member_id"]: int(r["settled_micro"]) for r in rows}


@pytest.mark.timeout(1200)
def _overlay_args() -> list[str]:
    """A replica's overlay options (as root with Nebula: CI), each its own lighthouse port."""
    if not OVERLAY:
        return []
    udp = free_port()
    return ["--overlay-listen", f"0.0.0.0:{udp}", "--overlay-advertise", f"127.0.0.1:{udp}"]


def _copy_ca(source: Path, target: Path) -> None:
    """What the operator does for every further replica: the first one's CA files."""
    target.mkdir(parents=True, mode=0o700, exist_ok=True)
    for name in ("ca.crt", "ca.key"):
        shutil.copy2(source / name, target / name)


def test_three_replicas_survive_the_heads_replica_dying(pg_url: str, tmp_path: Path) -> None:
    """As root with Nebula (CI) the replicas also serve one overlay: a lighthouse each, the
    CA copied from the first as an operator would; the head's replica dies with its
    lighthouse, and the job goes on over the overlay."""
    names = ("ra", "rb", "rc")
    reps = {
        n: CoordinatorProcess(
            tmp_path / n, pg_url, free_port(), "--bus", NATS, "--replica-id", n,
            "--heartbeat-timeout", "10", "--settle-interval", "2", "--restart-grace", "20",
            *_overlay_args(),
        )
        for n in names
    }  # fmt: skip
    agents: list[AgentProcess] = []
    user = KeyPair.generate()
    try:
        reps["ra"].start(timeout=240)  # migrates the schema first (slow on a loaded CI)
        if OVERLAY:
            _copy_ca(tmp_path / "ra" / "overlay", tmp_path / "rb" / "overlay")
            _copy_ca(tmp_path / "ra" / "overlay", tmp_path / "rc" / "overlay")
        reps["rb"].start(timeout=240)
        reps["rc"].start(timeout=240)
        urls = {n: r.url for n, r in reps.items()}
        # Agent 0 starts on B, agent 1 on C; each may fail over to the two others.
        for i, first in enumerate(("rb", "rc")):
            order = [first] + [n for n in names if n != first]
            agents.append(
                AgentProcess(tmp_path / f"agent{i}", ",".join(urls[n] for n in order), f"ha{i}")
            )
        with LoomClient(urls["ra"], user) as a:
            _verified_or_forced(a, pg_url)
            held = _holders(pg_url)
            assert sorted(r for r, _ in held.values()) == ["rb", "rc"], held
            a.deposit(DEPOSIT)
            t0 = time.monotonic()
            a.create_cluster({"name": "ha", "nodes": 2, "resources": {"cpus": 1}})  # via ra
            ready = a.wait_cluster("ha", timeout=180)
            assert ready.state == "running", ready.reason
            print(f"\ncluster formed through ra in {time.monotonic() - t0:.1f} s")
            members = _members(pg_url, ready.id)
            assert len(members) == 2
            if OVERLAY:  # on the one overlay, whichever replica signed (ra, through its loop)
                ips = [m.overlay_ip for m in ready.members]
                assert all(ips) and len(set(ips)) == 2, ready.members
                assert ready.head_address.split(":")[0] in ips, ready.head_address
            head_node = next(m.node_id for m in ready.members if m.role == "head")
            victim = _holders(pg_url)[head_node][0]
            assert victim in ("rb", "rc")
            # The user's tunnel enters through ra; the head's agent is on another replica.
            t1 = time.monotonic()
            answer = asyncio.run(_http_through_tunnel(urls["ra"], user, ready.id, ready.ray_token))
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            print(f"dashboard reached through ra -> {victim} in {time.monotonic() - t1:.2f} s")

            # The job: a task on each node that takes 12 s; the head's replica dies at 3 s.
            script = tmp_path / "job.py"
            script.write_text(JOB)
            env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ready.ray_token)
            job_log = tmp_path / "job.log"
            job = subprocess.Popen(
                [sys.executable, str(script), ready.head_address, "2", "12"],
                env=env, stdout=open(job_log, "w"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_for(lambda: "JOB-STARTED" in job_log.read_text(), 90, "the job to start")
            time.sleep(3)
            states: list[str] = []
            watching = threading.Event()

            def watch() -> None:
                with LoomClient(urls["ra"], user) as w:
                    while not watching.is_set():
                        states.append(w.cluster("ha").state)
                        time.sleep(0.5)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            moved_from = {n for n, (r, _) in _holders(pg_url).items() if r == victim}
            killed_at = time.monotonic()
            reps[victim].kill()
            wait_for(
                lambda: all(_holders(pg_url)[n][0] not in (victim,) for n in moved_from),
                60, "the dead replica's agents to reconnect elsewhere", interval=0.05,
            )  # fmt: skip
            reconnect_s = time.monotonic() - killed_at
            print(f"agents of {victim} reconnected elsewhere in {reconnect_s:.2f} s")
            assert reconnect_s < 15
            assert job.wait(240) == 0, job_log.read_text()[-3000:]
            watching.set()
            watcher.join(10)
            assert states and set(states) == {"running"}, states
            # No member started twice: the same two members, both still ready.
            after = _members(pg_url, ready.id)
            assert sorted(m["id"] for m in after) == sorted(m["id"] for m in members)
            assert {m["state"] for m in after} == {"ready"}, after
            again = a.cluster("ha")
            assert {m.id: m.ready_at for m in again.members} == {
                m.id: m.ready_at for m in ready.members
            }  # nobody restarted a member (its readiness would be new)
            a.delete_cluster("ha")
            wait_for(lambda: a.clusters() == [], 90, "the cluster to end")
            verified = a.ledger_verify()
            assert verified.ok, verified.failure
            assert verified.minted == DEPOSIT and verified.total == "0"
            txns: list[Any] = []
            while True:
                page = a.ledger_transactions(after=txns[-1].seq if txns else 0, limit=1000)
                if not page:
                    break
                txns.extend(page)
        paid: dict[str, int] = defaultdict(int)
        keys = [t.meta.get("idempotency_key") for t in txns if t.kind == "settle"]
        for t in txns:
            if t.kind == "settle":
                paid[t.meta["member"]] += -sum(
                    int(e.amount_micro) for e in t.entries if e.account.startswith("escrow:")
                )
        assert len([k for k in keys if k]) == len({k for k in keys if k})
        for member_id, settled in _meters(pg_url).items():
            assert paid.get(member_id, 0) == settled, member_id
    finally:
        for agent in agents:
            agent.kill(signal.SIGTERM)
        for agent in agents:
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.ensure_dead()
        for rep in reps.values():
            rep.stop()


def _verified_or_forced(client: LoomClient, url: str) -> None:
    """Both agents available. The CPU challenge is real; on a CI machine too loaded for
    it to reach the required rate (seen: 327 of 500 MOPS at load 27) the verdict is
    overridden in the database, and every replica told over NATS: this test is about
    replicas, test_verification about the challenge."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if _available(client) == 2:
            return
        devices = _devices(url)
        if len(devices) >= 2 and all(state != "claimed" for _, state in devices):
            break  # both verdicts are in, and not both passed
        time.sleep(0.5)
    print(f"\nforcing verification (this machine failed the CPU challenge): {_devices(url)}")
    schema = url.rsplit("schema=", 1)[1]
    ids = sorted({node for node, _ in _devices(url)})
    asyncio.run(_pg(f"UPDATE \"{schema}\".devices SET state = 'verified'"))
    asyncio.run(
        _pg(f"UPDATE \"{schema}\".nodes SET state = 'available' WHERE id = ANY($1::text[])", ids)
    )
    asyncio.run(_tell_replicas(ids))
    wait_for(lambda: _available(client) == 2, 60, "both agents available")


def _devices(url: str) -> list[tuple[str, str]]:
    schema = url.rsplit("schema=", 1)[1]
    rows = asyncio.run(_pg(f'SELECT node_id, state FROM "{schema}".devices'))
    return [(r["node_id"], r["state"]) for r in rows]


async def _tell_replicas(node_ids: list[str]) -> None:
    nc = await nats.connect(NATS)
    try:
        for node_id in node_ids:
            event = NodeChanged(node_id=node_id, cause=ChangeCause.DEVICE_VERDICT)
            await nc.publish("loom.events.node.changed", event.model_dump_json().encode())
        await nc.flush()
    finally:
        await nc.close()


def _available(client: LoomClient) -> int:
    try:
        return len([n for n in client.nodes() if n.state == "available"])
    except LoomConnectionError:  # a keep-alive connection closed under us (loaded CI)
        return -1


async def _http_through_tunnel(url: str, user: KeyPair, cluster_id: str, token: str) -> bytes:
    """GET the head's Ray dashboard /api/version through the coordinator's tunnel."""
    ws = await open_tunnel(url, user, cluster_id, "dashboard")
    try:
        request = (
            "GET /api/version HTTP/1.1\r\nHost: head\r\nConnection: close\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        )
        await ws.send(request.encode())
        got = b""
        async with asyncio.timeout(60):
            async for frame in ws:
                if isinstance(frame, bytes):
                    got += frame
                else:  # the head closed its side: {"type": "eof"}
                    break
        return got
    finally:
        await ws.close()
