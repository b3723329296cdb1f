"""The explorer's view of the ledger: totals by account class, the latest transactions,
and the result of re-verifying the hash chain (cached per chain head).

The ledger is public by design (anyone may re-verify it), so transactions are shown as
they are; account keys are public keys.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import AccountBalance, LedgerEntry, LedgerHead, LedgerTransaction
from loom.coordinator.services import ledger
from loom.core.ledger import FAUCET, FEES
from loom.core.money import format_credits

Json = dict[str, Any]


async def _sum_balances(session: AsyncSession, prefix: str) -> int:
    value = await session.scalar(
        select(func.coalesce(func.sum(AccountBalance.balance_micro), 0)).where(
            AccountBalance.account.like(f"{prefix}%")
        )
    )
    return int(value or 0)


async def totals_micro(session: AsyncSession) -> dict[str, int]:
    """Money by where it sits now, and what ever flowed to suppliers (micro-credits)."""
    earned = await session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0)).where(
            LedgerEntry.account.like("earnings:%"), LedgerEntry.amount_micro > 0
        )
    )
    return {
        "minted": -(await _sum_balances(session, FAUCET)),
        "user_balances": await _sum_balances(session, "user:"),
        "escrow": await _sum_balances(session, "escrow:"),
        "earnings_unpaid": await _sum_balances(session, "earnings:"),
        "fees": await _sum_balances(session, FEES),
        "paid_out": await _sum_balances(session, "payout:"),
        "earned_by_suppliers": int(earned or 0),
    }


async def summary(session: AsyncSession, *, latest: int = 25) -> Json:
    kinds = {
        k: int(n)
        for k, n in await session.execute(
            select(LedgerTransaction.kind, func.count()).group_by(LedgerTransaction.kind)
        )
    }
    head = (await session.execute(select(LedgerHead.seq, LedgerHead.hash))).first()
    head_seq = int(head[0]) if head else 0
    txns = await ledger.transactions(session, after=max(0, head_seq - latest), limit=latest)
    rows = []
    for t in reversed(txns):
        moved = sum(a for _, a in t.entries if a > 0)
        rows.append(
            {
                "seq": t.seq,
                "kind": t.kind,
                "at": t.created_at / 1e6,
                "amount": format_credits(moved),
                "entries": [{"account": acc, "amount": format_credits(a)} for acc, a in t.entries],
                "hash": t.hash,
                "prev_hash": t.prev_hash,
            }
        )
    return {
        "count": sum(kinds.values()),
        "by_kind": dict(sorted(Counter(kinds).items())),
        "head_seq": head_seq,
        "head_hash": str(head[1]) if head else "",
        "totals": {k: format_credits(v) for k, v in (await totals_micro(session)).items()},
        "latest": rows,
    }


@dataclass
class VerifyCache:
    """One verification per chain head: the chain is append-only, so a result for seq N
    stays true until the head moves."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    seq: int = -1
    result: Json | None = None

    async def verify(self, session: AsyncSession) -> Json:
        async with self.lock:
            head = await session.scalar(select(LedgerHead.seq))
            if self.result is not None and head == self.seq:
                return self.result
            result = await ledger.verify(session)
            out: Json = {
                "available": True,
                "ok": result.ok,
                "count": result.count,
                "last_seq": result.last_seq,
                "head_hash": result.head_hash,
                "minted": format_credits(result.minted_micro),
                "total": format_credits(result.total_micro),
                "failure": result.failure,
            }
            if result.ok:
                self.seq, self.result = result.last_seq, out
            return out
