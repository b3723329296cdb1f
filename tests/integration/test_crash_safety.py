"""Crash safety of the money plane: a coordinator process SIGKILLed at random moments
during a stream of deposits, cluster creations, settlements and teardowns, restarted each
time. At the end the chain verifies, no credit was created or lost, every escrow is back
to zero, and no member was paid more than its healthy time — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from loom.client.sdk import LoomAPIError, LoomClient, LoomError
from loom.coordinator.db.engine import create_engine, session_factory
from loom.coordinator.db.models import AccountBalance, Member, MemberMeter
from loom.core.metering import cost_micro
from loom.protocol.identity import KeyPair
from support.fakeagent import FakeAgents, force_available
from support.servers import free_port, wait_for
from support.vouch import vouch

pytestmark = pytest.mark.slow

DEPOSIT = "5"
PRICE = "36"  # credits per core-hour: 0.01 a second, so every second shows in the books


class CoordinatorProcess:
    def __init__(self, db_url: str, home: Path) -> None:
        self.db_url = db_url
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ, LOOM_HOME=str(self.home))
        log = open(self.home / f"coordinator-{self.starts}.log", "wb")
        self.starts += 1
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loom",
                "coordinator",
                "serve",
                "--faucet",
                "--db",
                self.db_url,
                "--port",
                str(self.port),
                "--settle-interval",
                "0.3",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._healthy, 120, "the coordinator to serve", interval=0.1)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _db(db_url: str, work: Any) -> Any:
    async def run() -> Any:
        engine = create_engine(db_url)
        try:
            return await work(session_factory(engine))
        finally:
            await engine.dispose()

    return asyncio.run(run())


class Workload:
    """Users depositing, creating and deleting clusters until told to stop."""

    def __init__(self, url: str, users: list[KeyPair], seed: int) -> None:
        self.url = url
        self.users = users
        self.rng = random.Random(seed)
        self.deposit_keys: dict[str, list[str]] = defaultdict(list)
        self.stop = threading.Event()
        self.ops = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            key = self.rng.choice(self.users)
            with LoomClient(self.url, key, timeout=5) as c:
                op = self.rng.random()
                try:
                    if op < 0.4:
                        n += 1
                        dkey = f"d{n}"
                        self.deposit_keys[key.public_hex].append(dkey)
                        c.deposit(DEPOSIT, idempotency_key=dkey)
                    elif op < 0.75:
                        c.create_cluster({"resources": {"cpus": 1}, "duration": "10m"})
                    else:
                        live = [x for x in c.clusters() if x.state in ("running", "provisioning")]
                        if live:
                            c.delete_cluster(self.rng.choice(live).id)
                    self.ops += 1
                except LoomError:
                    time.sleep(0.05)
            time.sleep(self.rng.random() * 0.15)


class Voucher:
    """Stands in for honest peers: confirms every ready member four times a second.

    Fake agents run no Ray, so nobody else could vouch for them and nothing would be
    billed (billing counts only confirmed time, see services.confirmation).
    """

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.vouched = 0
        self.errors: list[str] = []

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        engine = create_engine(self.db_url)
        sessions = session_factory(engine)
        try:
            while not self.stop.is_set():
                try:
                    self.vouched += await vouch(sessions, None)
                except Exception as exc:  # the database may be busy while we kill
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.25)
        finally:
            await engine.dispose()


def _escrows(db_url: str) -> dict[str, int]:
    async def read(sessions: Any) -> dict[str, int]:
        async with sessions() as s:
            rows = await s.execute(
                select(AccountBalance.account, AccountBalance.balance_micro).where(
                    AccountBalance.account.like("escrow:%")
                )
            )
            return {a: int(b) for a, b in rows if b}

    result: dict[str, int] = _db(db_url, read)
    return result


def _meters(db_url: str) -> list[tuple[Member, MemberMeter | None]]:
    async def read(sessions: Any) -> list[tuple[Member, MemberMeter | None]]:
        async with sessions() as s:
            rows = await s.execute(
                select(Member, MemberMeter).outerjoin(
                    MemberMeter, MemberMeter.member_id == Member.id
                )
            )
            return [(m, mm) for m, mm in rows]

    result: list[tuple[Member, MemberMeter | None]] = _db(db_url, read)
    return result


def test_sigkill_during_money_stream(tmp_path: Path, db_url: str) -> None:
    seed = int(os.environ.get("LOOM_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    coordinator = CoordinatorProcess(db_url, tmp_path)
    coordinator.start()
    fakes = FakeAgents(coordinator.url)
    users = [KeyPair.generate() for _ in range(2)]
    try:
        for i in range(3):
            fakes.add(f"n{i}", price=PRICE, cpu_cores=2)
        _db(db_url, lambda s: force_available(s, [n.node_id for n in fakes.nodes]))
        work = Workload(coordinator.url, users, seed)
        voucher = Voucher(db_url)
        voucher.thread.start()
        work.thread.start()
        for _cycle in range(4):
            time.sleep(rng.uniform(0.5, 2.5))
            coordinator.kill()
            coordinator.start()
            fakes.wait_connected()
        time.sleep(1.0)
        work.stop.set()
        work.thread.join(30)
        voucher.stop.set()
        voucher.thread.join(30)
        assert voucher.vouched > 0, f"nothing vouched: {voucher.errors[-3:]} (seed {seed})"
        assert work.ops > 10, f"the workload barely ran (seed {seed})"

        # Replaying every deposit ever attempted mints nothing twice.
        for user in users:
            with LoomClient(coordinator.url, user) as c:
                for dkey in work.deposit_keys[user.public_hex]:
                    c.deposit(DEPOSIT, idempotency_key=dkey)
                for cluster in c.clusters():
                    try:
                        c.delete_cluster(cluster.id)
                    except LoomAPIError as exc:
                        if exc.code != "cluster_ended":
                            raise
                wait_for(lambda c=c: c.clusters() == [], 30, "every cluster to end")
        wait_for(lambda: _escrows(db_url) == {}, 20, "every escrow to be refunded")

        with LoomClient(coordinator.url, users[0]) as c:
            verified = c.ledger_verify()
            assert verified.ok, f"{verified.failure} (seed {seed})"
            deposits = sum(len(v) for v in work.deposit_keys.values())
            assert verified.minted == str(5 * deposits) and verified.total == "0"
            txns = []
            while True:
                page = c.ledger_transactions(after=txns[-1].seq if txns else 0, limit=1000)
                if not page:
                    break
                txns.extend(page)
        # Nothing paid twice: what each member was paid is what its meter says, which is
        # never more than its healthy time costs.
        paid: dict[str, int] = defaultdict(int)
        for t in txns:
            if t.kind == "settle":
                paid[t.meta["member"]] += -sum(
                    int(e.amount_micro) for e in t.entries if e.account.startswith("escrow:")
                )
        kinds = {t.kind for t in txns}
        assert {"deposit", "hold", "settle", "refund"} <= kinds, f"{kinds} (seed {seed})"
        for member, meter in _meters(db_url):
            got = paid.get(member.id, 0)
            if meter is None:
                assert got == 0
                continue
            assert got == meter.settled_micro, f"member {member.id} (seed {seed})"
            assert member.ready_at is not None and member.ended_at is not None
            healthy = int(member.ended_at - member.ready_at) + 1
            assert meter.accrued_micro <= cost_micro(member.price_micro, member.units, healthy)
            assert meter.settled_micro + meter.written_off_micro == meter.accrued_micro
    finally:
        fakes.close()
        coordinator.stop()
