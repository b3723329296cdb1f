"""The ledger and billing services on a real database (SQLite, or PostgreSQL by env)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.db.models import (
    AccountBalance,
    Cluster,
    LedgerEntry,
    Member,
    MemberMeter,
    Node,
)
from loom.coordinator.errors import BadRequest, Conflict, PaymentRequired
from loom.coordinator.services import billing, ledger
from loom.coordinator.services import ledger_privacy as privacy
from loom.core import ledger as core
from loom.core.money import MICRO
from loom.core.spec import parse_spec

USER = "a" * 64
SUPPLIER = "b" * 64
T0 = 1_800_000_000.0


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(db_url)
    await migrate(eng)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


async def _deposit(s: AsyncSession, key: str, credits: int, user: str = USER) -> core.Transaction:
    return await ledger.post(
        s, core.DEPOSIT, key, core.deposit_entries(user, credits * MICRO), {}, T0
    )


async def test_post_replay_conflict_and_refusals_write_nothing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as s:
        first = await _deposit(s, "d1", 10)
        await s.commit()
    async with sessions() as s:
        again = await _deposit(s, "d1", 10)
        assert again == first
        with pytest.raises(Conflict):
            await _deposit(s, "d1", 11)
        await s.rollback()
    async with sessions() as s:
        with pytest.raises(PaymentRequired) as info:
            await ledger.post(
                s, core.HOLD, "h1", core.hold_entries(USER, "c-1", 11 * MICRO), {}, T0
            )
        assert "short by 1" in info.value.message
        await s.rollback()
    async with sessions() as s:
        with pytest.raises(BadRequest):
            await ledger.post(
                s, core.HOLD, "bad", [(core.user_account(USER), -5), ("escrow:c-1", 4)], {}, T0
            )
        await s.rollback()
    async with sessions() as s:
        assert await ledger.count(s) == 1
        assert await ledger.balance(s, core.user_account(USER)) == 10 * MICRO
        result = await ledger.verify(s)
        assert result.ok, result.failure
        assert (result.count, result.minted_micro, result.total_micro) == (1, 10 * MICRO, 0)


async def test_verify_detects_tampering(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as s:
        for i in range(5):
            await _deposit(s, f"d{i}", i + 1)
        await s.commit()
    async with sessions() as s:
        alias = (await privacy.public_names(s, [core.user_account(USER)]))[core.user_account(USER)]
        assert alias != core.user_account(USER)  # the chain holds a pseudonym, not the key
        await s.execute(
            update(AccountBalance).where(AccountBalance.account == alias).values(balance_micro=1)
        )
        result = await ledger.verify(s)
        assert not result.ok and "account_balances" in (result.failure or "")
        await s.rollback()
    async with sessions() as s:
        await s.execute(
            update(LedgerEntry)
            .where(LedgerEntry.txn_seq == 3, LedgerEntry.account == core.FAUCET)
            .values(amount_micro=-1)
        )
        result = await ledger.verify(s)
        assert not result.ok and result.count == 2 and "seq 3" in (result.failure or "")
        await s.rollback()


async def test_concurrent_posts_serialize(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Many writers at once: every post lands once, the chain verifies, no overdraft."""

    async def deposit(i: int) -> None:
        async with sessions() as s:
            await _deposit(s, f"dep-{i}", 1)
            await s.commit()

    async def hold(i: int) -> bool:
        async with sessions() as s:
            try:
                await ledger.post(
                    s, core.HOLD, f"hold-{i}", core.hold_entries(USER, f"c-{i}", 3 * MICRO), {}, T0
                )
            except PaymentRequired:
                await s.rollback()
                return False
            await s.commit()
            return True

    await asyncio.gather(*(deposit(i) for i in range(12)))
    held = await asyncio.gather(*(hold(i) for i in range(8)), *(deposit(i) for i in range(12)))
    async with sessions() as s:
        result = await ledger.verify(s)
        assert result.ok, result.failure
        holds = sum(1 for h in held if h is True)
        assert 1 <= holds <= 4  # 12 credits cover at most 4 holds of 3
        assert result.count == 12 + holds
        alias = (await privacy.public_names(s, [core.user_account(USER)]))[core.user_account(USER)]
        assert result.balances[alias] == (12 - 3 * holds) * MICRO
        assert await ledger.balance(s, core.user_account(USER)) == (12 - 3 * holds) * MICRO


async def _cluster(s: AsyncSession, price_credits: str = "0.36", units: int = 2) -> Cluster:
    s.add(
        Node(
            id="n-1",
            node_key="k" * 64,
            owner_key=SUPPLIER,
            name="box",
            region="eu-west",
            state="allocated",
            state_changed_at=T0,
            registered_at=T0,
        )
    )
    await s.flush()
    cluster = Cluster(
        id="c-1",
        name="demo",
        owner_key=USER,
        state="running",
        reason="",
        spec_json="{}",
        ray_token="t",
        hourly_micro=0,
        created_at=T0,
        expires_at=T0 + 3600,
        state_changed_at=T0,
    )
    s.add(cluster)
    await s.flush()
    price = int(float(price_credits) * MICRO)
    s.add(
        Member(
            id="m-1",
            cluster_id="c-1",
            node_id="n-1",
            role="head",
            state="ready",
            model="cpu",
            units=units,
            price_micro=price,
            created_at=T0,
            ready_at=T0 + 10,
        )
    )
    cluster.hourly_micro = price * units
    await s.flush()
    return cluster


async def _confirmed_until(sessions: async_sessionmaker[AsyncSession], at: float) -> None:
    """The member confirmed by a peer without a gap from ready (T0 + 10) until ``at``."""
    async with sessions() as s:
        await s.execute(update(Member).values(confirmed_s=at - (T0 + 10), confirmed_last=at))
        await s.commit()


async def test_hold_meter_settle_refund(sessions: async_sessionmaker[AsyncSession]) -> None:
    spec = parse_spec({"resources": {"cpus": 2}, "duration": "1h"})
    async with sessions() as s:
        cluster = await _cluster(s)
        with pytest.raises(PaymentRequired) as info:
            await billing.hold_for_cluster(s, cluster, spec, T0)
        msg = info.value.message
        assert "balance 0 credits, need 0.72" in msg and "loom credits deposit 0.72" in msg
        await s.rollback()
    async with sessions() as s:
        await _deposit(s, "d", 1)
        cluster = await _cluster(s)
        assert await billing.hold_for_cluster(s, cluster, spec, T0) == 720_000
        await s.commit()
    # 100 s confirmed at 0.72/h = 0.02 credits; 5 % fee.
    await _confirmed_until(sessions, T0 + 110.5)
    for _ in range(2):  # the same step twice pays once
        async with sessions() as s:
            report = await billing.meter_and_settle(s, T0 + 110.5, 500)
            await s.commit()
    assert report.transactions == 0
    async with sessions() as s:
        assert await ledger.balance(s, core.earnings_account(SUPPLIER)) == 19_000
        assert await ledger.balance(s, core.FEES) == 1_000
        meter = await s.scalar(select(MemberMeter))
        assert meter is not None and meter.billed_s == 100
        await s.execute(
            update(Member).values(state="released", ended_at=T0 + 200.9, confirmed_s=190.9)
        )
        refund = await billing.close_cluster(s, "c-1", T0 + 300, 500)
        await s.commit()
    # 190 s in all = 0.038 credits; refund = 0.72 - 0.038
    assert refund == 720_000 - 38_000
    async with sessions() as s:
        assert await ledger.balance(s, core.user_account(USER)) == MICRO - 38_000
        assert await billing.close_cluster(s, "c-1", T0 + 400, 500) == 0
        result = await ledger.verify(s)
        assert result.ok and result.total_micro == 0, result.failure


async def test_exhaustion_warns_then_stops(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as s:
        await _deposit(s, "d", 1)
        cluster = await _cluster(s, price_credits="3.6", units=1)  # 1000 µ/s
        await billing.hold_for_cluster(s, cluster, parse_spec({"duration": "10m"}), T0)
        await s.commit()
    await _confirmed_until(sessions, T0 + 70)
    async with sessions() as s:
        await billing.meter_and_settle(s, T0 + 70, 500)
        assert await billing.exhausted_clusters(s, T0 + 70, warn_s=900) == []
        got = await s.get(Cluster, "c-1")
        assert got is not None and got.reason.startswith("escrow runs out in 9m")
        await s.commit()
    await _confirmed_until(sessions, T0 + 700)
    async with sessions() as s:
        await billing.meter_and_settle(s, T0 + 700, 500)
        assert await billing.exhausted_clusters(s, T0 + 700) == ["c-1"]
        await s.commit()
    async with sessions() as s:
        assert await ledger.balance(s, core.escrow_account("c-1")) == 0
        meter = await s.scalar(select(MemberMeter))
        assert meter is not None and billing.unsettled(meter) == 90_000  # 90 s uncovered
        await billing.close_cluster(s, "c-1", T0 + 700, 500)
        await s.commit()
        meter = await s.scalar(select(MemberMeter).execution_options(populate_existing=True))
        assert meter is not None and meter.written_off_micro == 90_000
        assert (await ledger.verify(s)).ok
