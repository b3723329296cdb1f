"""The ledger in the database: post transactions, read balances, re-verify the chain.

Appending lives in `ledger_write` (re-exported here: `lock_head`, `post`, `seal`): every
append locks the single `ledger_head` row first, inside the caller's DB transaction, so
whatever else the caller changed in that transaction (metering state, a cluster's
devices) commits or rolls back together with the ledger rows, which is what makes a crash
at any moment harmless. High-rate transfers go through the per-ledger sequencer
(`ledger_sequencer`), which seals them in batches on the same lock.

Private account names (``user:<key>``, ``escrow:<cluster>``) and idempotency keys enter
the chain as pseudonyms (`ledger_privacy`); every function here takes and returns the
private names, so callers never see the difference.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import AccountBalance, LedgerEntry, LedgerHead, LedgerTransaction
from loom.coordinator.services import ledger_privacy as privacy
from loom.coordinator.services import ledger_write as write
from loom.coordinator.services.ledger_write import BALANCE_LIMIT as BALANCE_LIMIT
from loom.coordinator.services.ledger_write import HEAD_ID as HEAD_ID
from loom.coordinator.services.ledger_write import Transfer as Transfer
from loom.coordinator.services.ledger_write import lock_head as lock_head
from loom.coordinator.services.ledger_write import post as post
from loom.coordinator.services.ledger_write import seal as seal
from loom.core import ledger as core
from loom.core import ledger_verify as lv
from loom.core.ledger import Transaction

CHUNK = 2000
_txn = write.txn_of
_TXN_COLUMNS = write.TXN_COLUMNS
_TxnRow = write.TxnRow


async def get_by_key(session: AsyncSession, key: str) -> Transaction | None:
    """The transaction posted under ``key``, its accounts under their private names."""
    txn = await _get_public(session, key)
    return None if txn is None else await _privately(session, txn)


async def _privately(session: AsyncSession, txn: Transaction) -> Transaction:
    """``txn`` with its accounts under their private names (its hash is of the public form)."""
    names = await privacy.private_names(session, [e.account for e in txn.entries])
    entries = core.canonical_entries((names[a], m) for a, m in txn.entries)
    return dataclasses.replace(txn, entries=entries)


async def _get_public(session: AsyncSession, key: str) -> Transaction | None:
    public = await privacy.public_key(session, key)  # as the chain holds it
    row = (
        await session.execute(
            select(*_TXN_COLUMNS).where(LedgerTransaction.idempotency_key.in_({public, key}))
        )
    ).first()
    if row is None:
        return None
    entries = await session.execute(
        select(LedgerEntry.account, LedgerEntry.amount_micro).where(LedgerEntry.txn_seq == row[0])
    )
    return _txn(row, entries)


async def balances_of(session: AsyncSession, accounts: Sequence[str]) -> dict[str, int]:
    """Balances by account name (private names are looked up under their public alias)."""
    if not accounts:
        return {}
    names = await privacy.public_names(session, accounts)
    back = {v: k for k, v in names.items()}
    rows = await session.execute(
        select(AccountBalance.account, AccountBalance.balance_micro).where(
            AccountBalance.account.in_(list(back))
        )
    )
    return {back[a]: int(b) for a, b in rows}


async def balance(session: AsyncSession, account: str) -> int:
    return (await balances_of(session, [account])).get(account, 0)


# --------------------------------------------------------------------------- reading


async def iter_chunks(
    session: AsyncSession, *, after: int = 0, limit: int | None = None, chunk: int = CHUNK
) -> AsyncIterator[list[Transaction]]:
    """Transactions with seq > ``after`` in seq order, a chunk at a time (keyset paging)."""
    left = limit
    while left is None or left > 0:
        size = chunk if left is None else min(chunk, left)
        rows: list[_TxnRow] = [
            r
            for r in await session.execute(
                select(*_TXN_COLUMNS)
                .where(LedgerTransaction.seq > after)
                .order_by(LedgerTransaction.seq)
                .limit(size)
            )
        ]
        if not rows:
            return
        first, last = int(rows[0][0]), int(rows[-1][0])
        by_seq: dict[int, list[tuple[str, int]]] = {}
        entries = await session.execute(
            select(LedgerEntry.txn_seq, LedgerEntry.account, LedgerEntry.amount_micro).where(
                LedgerEntry.txn_seq >= first, LedgerEntry.txn_seq <= last
            )
        )
        for seq, account, amount in entries:
            by_seq.setdefault(int(seq), []).append((account, int(amount)))
        yield [_txn(r, by_seq.get(int(r[0]), ())) for r in rows]
        after = last
        if left is not None:
            left -= len(rows)


async def transactions(session: AsyncSession, *, after: int, limit: int) -> list[Transaction]:
    out: list[Transaction] = []
    async for chunk in iter_chunks(session, after=after, limit=limit):
        out.extend(chunk)
    return out


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    count: int
    last_seq: int
    head_hash: str
    stored_head_seq: int
    stored_head_hash: str
    minted_micro: int
    total_micro: int  # sum of every balance, faucet included: always 0
    failure: str | None
    balances: dict[str, int]


_DONE = object()


async def verify(session: AsyncSession) -> VerifyResult:
    """Re-verify the whole chain from the database, and the cached balances and head.

    Rows stream in seq order through `loom.core.ledger_verify.verify_chain`, which runs in a
    worker thread fed chunk by chunk (bounded queue), so memory stays flat.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=4)
    stop = False

    def feed() -> Iterator[Transaction]:
        while True:
            item = q.get()
            if item is _DONE:
                return
            assert isinstance(item, list)
            yield from item

    def run() -> lv.VerifyReport:
        nonlocal stop
        try:
            # The unique index on idempotency_key already guarantees unique keys.
            return lv.verify_chain(feed(), check_keys=False)
        finally:
            stop = True
            while True:  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    break

    worker = asyncio.ensure_future(asyncio.to_thread(run))

    def put(item: object) -> None:
        while not stop:
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    try:
        async for chunk in iter_chunks(session):
            await asyncio.to_thread(put, chunk)
            if stop:
                break
        await asyncio.to_thread(put, _DONE)
    finally:
        if not worker.done():
            await asyncio.to_thread(put, _DONE)
    report = await worker
    head = (await session.execute(select(LedgerHead.seq, LedgerHead.hash))).one()
    stored = {
        a: int(b)
        for a, b in (
            await session.execute(select(AccountBalance.account, AccountBalance.balance_micro))
        )
    }
    failure = str(report.failure) if report.failure else None
    if failure is None:
        recomputed = {a: b for a, b in report.balances.items() if b != 0}
        cached = {a: b for a, b in stored.items() if b != 0}
        if recomputed != cached:
            wrong = sorted(set(recomputed.items()) ^ set(cached.items()))[:3]
            failure = f"account_balances disagree with the entries: {wrong}"
        elif (int(head[0]), str(head[1])) != (report.last_seq, report.head_hash):
            failure = (
                f"ledger_head says seq {head[0]} {head[1]}, the chain ends at seq "
                f"{report.last_seq} {report.head_hash}"
            )
    return VerifyResult(
        ok=failure is None,
        count=report.count,
        last_seq=report.last_seq,
        head_hash=report.head_hash,
        stored_head_seq=int(head[0]),
        stored_head_hash=str(head[1]),
        minted_micro=report.minted_micro,
        total_micro=sum(report.balances.values()),
        failure=failure,
        balances=report.balances,
    )


async def history(
    session: AsyncSession, accounts: Sequence[str], *, limit: int = 100, before: int | None = None
) -> list[tuple[Transaction, str, int]]:
    """Entries on ``accounts``, newest first: (transaction, account, amount)."""
    names = await privacy.public_names(session, accounts)
    back = {v: k for k, v in names.items()}
    stmt = (
        select(LedgerEntry.txn_seq, LedgerEntry.account, LedgerEntry.amount_micro)
        .where(LedgerEntry.account.in_(list(back)))
        .order_by(LedgerEntry.txn_seq.desc())
        .limit(limit)
    )
    if before is not None:
        stmt = stmt.where(LedgerEntry.txn_seq < before)
    hits = list(await session.execute(stmt))
    seqs = sorted({int(s) for s, _, _ in hits})
    rows: dict[int, _TxnRow] = {
        int(r[0]): r
        for r in await session.execute(select(*_TXN_COLUMNS).where(LedgerTransaction.seq.in_(seqs)))
    }
    clusters = await _clusters_of(session, seqs)
    out = []
    for seq, account, amount in hits:
        txn = _txn(rows[int(seq)], ())
        if int(seq) in clusters:  # for the owner's eyes: the chain itself names no cluster
            txn = dataclasses.replace(txn, meta={**txn.meta, "cluster": clusters[int(seq)]})
        out.append((txn, back.get(account, account), int(amount)))
    return out


async def _clusters_of(session: AsyncSession, seqs: Sequence[int]) -> dict[int, str]:
    """The cluster behind each transaction's escrow leg (private names), by seq."""
    if not seqs:
        return {}
    legs = list(
        await session.execute(
            select(LedgerEntry.txn_seq, LedgerEntry.account).where(
                LedgerEntry.txn_seq.in_(list(seqs)), LedgerEntry.account.like("escrow:%")
            )
        )
    )
    names = await privacy.private_names(session, [str(a) for _, a in legs])
    return {int(q): names[str(a)].removeprefix("escrow:") for q, a in legs}


async def count(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(LedgerTransaction)) or 0)
