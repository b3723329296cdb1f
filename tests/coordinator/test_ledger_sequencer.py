"""The ledger's sequencer on a real database (SQLite, or PostgreSQL by env): batches of
transfers sealed in one DB transaction each, callers awaiting their own seal."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loom.coordinator import leases
from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.db.models import LedgerQueued
from loom.coordinator.errors import BadRequest, Conflict, PaymentRequired, ServiceError
from loom.coordinator.services import ledger
from loom.coordinator.services.ledger_queue import LeasedRole, QueueHandoff
from loom.coordinator.services.ledger_sequencer import Sequencer
from loom.coordinator.services.ledger_write import Transfer
from loom.core import ledger as core
from loom.core.money import MICRO

T0 = 1_800_000_000.0
USERS = [f"{i:064x}" for i in range(1, 21)]


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


@pytest.fixture
async def sequencer(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[Sequencer]:
    seq = Sequencer(sessions, clock=lambda: T0)
    seq.start()
    try:
        yield seq
    finally:
        await seq.stop()


def deposit(user: str, credits: int, key: str) -> Transfer:
    return Transfer.of(core.DEPOSIT, key, core.deposit_entries(user, credits * MICRO))


def hold(user: str, cluster: str, credits: int, key: str) -> Transfer:
    return Transfer.of(core.HOLD, key, core.hold_entries(user, cluster, credits * MICRO))


async def _verified(sessions: async_sessionmaker[AsyncSession]) -> ledger.VerifyResult:
    async with sessions() as s:
        result = await ledger.verify(s)
    assert result.ok, result.failure
    assert result.total_micro == 0
    return result


async def test_hundreds_of_concurrent_posters_exact_balances(
    sessions: async_sessionmaker[AsyncSession], sequencer: Sequencer
) -> None:
    """400 deposits and 200 holds from 600 tasks at once: every accepted transfer lands
    once, balances are exact, holds beyond a user's balance are refused alone."""
    deposits = [sequencer.submit(deposit(USERS[i % 20], 1, f"d-{i}")) for i in range(400)]
    holds = [sequencer.submit(hold(USERS[i % 20], f"c-{i}", 3, f"h-{i}")) for i in range(200)]
    got = await asyncio.gather(*deposits, *holds, return_exceptions=True)
    assert all(isinstance(t, core.Transaction) for t in got[:400])
    held = [t for t in got[400:] if isinstance(t, core.Transaction)]
    refused = [t for t in got[400:] if not isinstance(t, core.Transaction)]
    assert all(isinstance(e, PaymentRequired) for e in refused)
    assert sequencer.stats.batches < 600  # batched, not one by one
    result = await _verified(sessions)
    assert result.count == 400 + len(held)
    assert result.minted_micro == 400 * MICRO
    async with sessions() as s:
        for j, user in enumerate(USERS):
            n_holds = sum(1 for t in held if core.user_account(user) in dict(t.entries))
            assert n_holds <= 6  # 20 credits each cover at most 6 holds of 3
            left = await ledger.balance(s, core.user_account(user))
            assert left == (20 - 3 * n_holds) * MICRO, j
    # Seqs are dense and every caller saw its own transaction.
    seqs = sorted(t.seq for t in got if isinstance(t, core.Transaction))
    assert seqs == list(range(1, len(seqs) + 1))


async def test_idempotency_and_a_bad_transfer_fails_only_itself(
    sessions: async_sessionmaker[AsyncSession], sequencer: Sequencer
) -> None:
    user = USERS[0]
    first, again, other, bad, broke, good = await asyncio.gather(
        sequencer.submit(deposit(user, 5, "k1")),
        sequencer.submit(deposit(user, 5, "k1")),  # same key, same movement: one transfer
        sequencer.submit(deposit(user, 6, "k1")),  # same key, different movement: refused
        sequencer.submit(  # malformed: refused before the database
            Transfer.of(core.HOLD, "k2", [(core.user_account(user), -5), ("escrow:c-1", 4)])
        ),
        sequencer.submit(hold(user, "c-2", 50, "k3")),  # more than the user holds
        sequencer.submit(hold(user, "c-3", 2, "k4")),
        return_exceptions=True,
    )
    assert isinstance(first, core.Transaction) and again == first
    assert isinstance(other, Conflict) and "k1" in other.message
    assert isinstance(bad, BadRequest)
    assert isinstance(broke, PaymentRequired) and "short by 45" in broke.message
    assert core.user_account(user) in broke.message  # the private name, never the alias
    assert isinstance(good, core.Transaction) and good.seq == first.seq + 1
    # A later batch replays the stored key too.
    assert await sequencer.submit(deposit(user, 5, "k1")) == first
    with pytest.raises(Conflict):
        await sequencer.submit(hold(user, "c-3", 1, "k4"))
    result = await _verified(sessions)
    assert result.count == 2
    async with sessions() as s:
        assert await ledger.balance(s, core.user_account(user)) == 3 * MICRO
        assert (await ledger.get_by_key(s, "k1")) == first


async def test_sequencer_and_direct_posts_share_the_lock(
    sessions: async_sessionmaker[AsyncSession], sequencer: Sequencer
) -> None:
    """Settlement-style posts inside their own DB transaction interleave with batches."""
    user = USERS[1]

    async def direct(i: int) -> None:
        async with sessions() as s:
            await ledger.post(
                s,
                core.DEPOSIT,
                f"direct-{i}",
                core.deposit_entries(user, MICRO),
                {},
                T0,
            )
            await s.commit()

    await asyncio.gather(
        *(sequencer.submit(deposit(user, 1, f"seq-{i}")) for i in range(100)),
        *(direct(i) for i in range(10)),
    )
    result = await _verified(sessions)
    assert result.count == 110
    async with sessions() as s:
        assert await ledger.balance(s, core.user_account(user)) == 110 * MICRO


# --------------------------------------------------------------------------- replicas


async def test_the_role_holder_seals_hand_offs_and_the_role_moves_after_expiry(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Two replicas on one database: B hands its transfers to A (the holder); A dies
    without releasing; after the lease expires B takes the role and continues the chain,
    sealing what was handed over meanwhile; A's stale lease seals nothing."""
    now = [T0]

    def replica(name: str) -> Sequencer:
        return Sequencer(
            sessions,
            role=LeasedRole(sessions, name, ttl_s=10.0),
            handoff=QueueHandoff(sessions, name, clock=lambda: now[0]),
            clock=lambda: now[0],
            poll_s=0.005,
        )

    a, b = replica("A"), replica("B")
    assert await a.role.held(now[0]) and not await b.role.held(now[0])
    a.start()
    b.start()
    try:
        user = USERS[2]
        first = await asyncio.gather(
            *(b.submit(deposit(user, 1, f"b-{i}")) for i in range(50)),
            *(a.submit(deposit(user, 1, f"a-{i}")) for i in range(50)),
            b.submit(hold(user, "c-9", 1000, "b-too-much")),
            return_exceptions=True,
        )
        assert all(isinstance(t, core.Transaction) for t in first[:100])
        assert isinstance(first[100], PaymentRequired)  # refused, and only it
        assert b.stats.handed_over == 51 and b.stats.batches == 0
        assert a.stats.sealed == 100 and a.stats.refused == 1
        # A dies (no release); B's transfers wait in the queue, durable.
        assert a._task is not None
        a._task.cancel()
        stale = a.role.lease if isinstance(a.role, LeasedRole) else None
        later = [asyncio.ensure_future(b.submit(deposit(user, 2, f"b2-{i}"))) for i in range(20)]
        await asyncio.sleep(0.2)
        assert not any(f.done() for f in later) and b.stats.handed_over == 71
        now[0] += 11.0  # past A's lease
        b._wake.set()
        sealed = await asyncio.wait_for(asyncio.gather(*later), 30)
        assert b.stats.holder_since == now[0]
        top = max(t.seq for t in first if isinstance(t, core.Transaction))
        assert sorted(t.seq for t in sealed) == list(range(top + 1, top + 21))
        # The old holder's lease no longer guards anything.
        assert stale is not None
        async with sessions() as s:
            assert not await leases.guard_role(
                s, stale, action="seal", item_id="batch", now=now[0], record=False
            )
            await s.rollback()
        # And the old holder, back, hands over instead of sealing.
        a.start()
        assert (await a.submit(deposit(user, 1, "a-back"))).seq == top + 21
        assert a.stats.handed_over == 1
    finally:
        await a.stop()
        await b.stop()
    result = await _verified(sessions)
    assert result.count == 100 + 20 + 1
    async with sessions() as s:
        assert await ledger.balance(s, core.user_account(user)) == (100 + 40 + 1) * MICRO
        assert await s.scalar(select(func.count()).select_from(LedgerQueued)) == 0


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Op:
    kind: str  # deposit | hold | refund
    user: int
    cluster: int
    credits: int
    key: int  # keys are drawn from a small set: replays and conflicts happen


OPS = st.builds(
    Op,
    kind=st.sampled_from(["deposit", "hold", "refund"]),
    user=st.integers(0, 2),
    cluster=st.integers(0, 2),
    credits=st.integers(1, 6),
    key=st.integers(0, 14),
)
_run = itertools.count()


def _transfer(op: Op, run: int) -> Transfer:
    tag = f"r{run}"
    # An escrow is refunded to the user who funded it (verify checks it): one user's clusters.
    user, cluster = f"{run:032x}{op.user + 1:032x}", f"{tag}-u{op.user}-c{op.cluster}"
    key, amount = f"{tag}-k{op.key}", op.credits * MICRO
    if op.kind == "deposit":
        return Transfer.of(core.DEPOSIT, key, core.deposit_entries(user, amount))
    if op.kind == "hold":
        return Transfer.of(core.HOLD, key, core.hold_entries(user, cluster, amount))
    return Transfer.of(core.REFUND, key, core.refund_entries(cluster, user, amount))


def _model(transfers: list[Transfer]) -> tuple[list[str], dict[str, int]]:
    """What posting one by one gives: per transfer "ok"/"replay"/409/402; the balances."""
    balances: dict[str, int] = {}
    keys: dict[str, Transfer] = {}
    out = []
    for t in transfers:
        if t.key in keys:
            same = (keys[t.key].kind, keys[t.key].entries) == (t.kind, t.entries)
            out.append("replay" if same else "409")
            continue
        trial = dict(balances)
        for account, amount in t.entries:
            trial[account] = trial.get(account, 0) + amount
        if any(b < 0 and a != core.FAUCET for a, b in trial.items()):
            out.append("402")
            continue
        balances, keys[t.key] = trial, t
        out.append("ok")
    return out, balances


def _outcome(result: object) -> str:
    if isinstance(result, core.Transaction):
        return "tx"
    assert isinstance(result, ServiceError), result
    return str(result.status)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=1, max_size=40), batch=st.integers(1, 7))
def test_random_sequences_match_the_model(db_url: str, ops: list[Op], batch: int) -> None:
    """Random transfers through the sequencer (random batch sizes, all submitted at once)
    give the same outcomes and balances as the one-by-one model; the chain verifies."""
    run = next(_run)  # fresh accounts and keys per example, one database
    transfers = [_transfer(op, run) for op in ops]
    expected, balances = _model(transfers)

    async def go() -> None:
        eng = create_engine(db_url)
        await migrate(eng)
        sessions = session_factory(eng)
        seq = Sequencer(sessions, max_batch=batch, clock=lambda: T0)
        seq.start()
        try:
            got = await asyncio.gather(*(seq.submit(t) for t in transfers), return_exceptions=True)
            assert [_outcome(r) for r in got] == [
                "tx" if e in ("ok", "replay") else e for e in expected
            ]
            firsts: dict[str, core.Transaction] = {}
            for t, r, e in zip(transfers, got, expected, strict=True):
                if e == "ok":
                    assert isinstance(r, core.Transaction)
                    firsts[t.key] = r
                elif e == "replay":
                    assert r == firsts[t.key]
            async with sessions() as s:
                accounts = [a for a in balances if a != core.FAUCET]  # the faucet is shared
                stored = await ledger.balances_of(s, accounts)
                assert {a: stored.get(a, 0) for a in accounts} == {a: balances[a] for a in accounts}
                result = await ledger.verify(s)
                assert result.ok, result.failure
        finally:
            await seq.stop()
            await eng.dispose()

    asyncio.run(go())
