"""Credits, earnings, payouts, the public ledger, offers and quotes.

Signed routes act only on the caller's own accounts: a deposit credits ``user:<caller>``,
a payout debits ``earnings:<caller>``; no request body names an account. The ledger's
verification and its transactions are public (the explorer and offline auditors).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from loom.coordinator.api.deps import CallerDep, SessionDep, StateDep
from loom.coordinator.db.models import LedgerEntry, LedgerHead, LedgerTransaction
from loom.coordinator.errors import BadRequest
from loom.coordinator.services import billing, ledger, market, payouts
from loom.coordinator.services import clusters as cluster_service
from loom.core import ledger as core
from loom.core.money import AmountError, format_credits, parse_credits
from loom.core.query import Offer
from loom.protocol.money import (
    BalanceOut,
    CloudPriceOut,
    DepositRequest,
    EarningLineOut,
    EarningsOut,
    HistoryItem,
    LedgerEntryOut,
    LedgerTxnOut,
    LedgerVerifyOut,
    OfferOut,
    PayoutRequest,
    QuoteMemberOut,
    QuoteOut,
    QuoteRequest,
    TxnReceipt,
)

router = APIRouter(prefix="/v1", tags=["money"])

#: The largest ledger sequence number a query may name (JSON-safe; far beyond any chain).
MAX_SEQ = 2**53

#: The payout rail; real rails are later adapters with the same interface.
PAYOUTS: payouts.PayoutAdapter = payouts.LedgerPayouts()


def _amount(text: str) -> int:
    try:
        return parse_credits(text)
    except AmountError as exc:
        raise BadRequest("invalid_amount", f"amount: {exc}", field="amount") from None


def _receipt(txn: core.Transaction, account: str, balance: int, replayed: bool) -> TxnReceipt:
    moved = next((a for acc, a in txn.entries if acc == account), 0)
    return TxnReceipt(
        seq=txn.seq,
        kind=txn.kind,
        amount=format_credits(abs(moved)),
        hash=txn.hash,
        replayed=replayed,
        balance=format_credits(balance),
        receipt=txn.meta.get("receipt", ""),
    )


@router.post("/credits/deposit", response_model=TxnReceipt)
async def deposit(
    body: DepositRequest, session: SessionDep, state: StateDep, caller: CallerDep
) -> TxnReceipt:
    """Mint credits into your balance through the faucet (only with `serve --faucet`)."""
    faucet = payouts.Faucet(enabled=state.settings.faucet)
    faucet.check(core.user_account(caller), 0)
    amount = _amount(body.amount)
    key = payouts.client_key("deposit", caller, body.idempotency_key)
    replayed = await ledger.get_by_key(session, key) is not None
    if state.ledger is not None:
        await session.rollback()  # hold no transaction while the sequencer seals it
    txn = await payouts.deposit(session, faucet, caller, amount, key, time.time(), state.ledger)
    account = core.user_account(caller)
    balance = await ledger.balance(session, account)
    await session.commit()
    return _receipt(txn, account, balance, replayed)


@router.get("/credits/balance", response_model=BalanceOut)
async def balance(session: SessionDep, caller: CallerDep) -> BalanceOut:
    return BalanceOut(
        account=caller,
        balance=format_credits(await ledger.balance(session, core.user_account(caller))),
        escrowed=format_credits(await billing.escrowed_by(session, caller)),
        earnings=format_credits(await ledger.balance(session, core.earnings_account(caller))),
    )


@router.get("/credits/history", response_model=list[HistoryItem])
async def history(
    session: SessionDep,
    caller: CallerDep,
    limit: int = Query(default=50, ge=1, le=1000),
    before: int | None = Query(
        default=None, ge=1, le=MAX_SEQ, description="only entries before this seq"
    ),
) -> list[HistoryItem]:
    """Your movements (balance and earnings), newest first."""
    accounts = [core.user_account(caller), core.earnings_account(caller)]
    rows = await ledger.history(session, accounts, limit=limit, before=before)
    return [
        HistoryItem(
            seq=txn.seq,
            kind=txn.kind,
            account=account.partition(":")[0],
            amount=format_credits(amount),
            created_at=txn.created_at / 1_000_000,
            memo=txn.meta.get("memo", ""),
            cluster=txn.meta.get("cluster", ""),
        )
        for txn, account, amount in rows
    ]


def _line(line: billing.EarningLine) -> EarningLineOut:
    return EarningLineOut(
        id=line.key,
        name=line.name,
        settled=format_credits(line.settled_micro),
        paid=format_credits(line.paid_micro),
        pending=format_credits(line.pending_micro),
    )


@router.get("/earnings", response_model=EarningsOut)
async def earnings(session: SessionDep, state: StateDep, caller: CallerDep) -> EarningsOut:
    """Your nodes' earnings: per node and per cluster, settled and pending."""
    nodes, clusters = await billing.earnings(session, caller, time.time())
    paid_out = await session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount_micro), 0))
        .join(LedgerTransaction, LedgerTransaction.seq == LedgerEntry.txn_seq)
        .where(
            LedgerEntry.account == core.earnings_account(caller),
            LedgerTransaction.kind == core.PAYOUT,
        )
    )
    return EarningsOut(
        account=caller,
        available=format_credits(await ledger.balance(session, core.earnings_account(caller))),
        paid_out=format_credits(-int(paid_out or 0)),
        fee_bps=state.settings.fee_bps,
        nodes=[_line(n) for n in nodes],
        clusters=[_line(c) for c in clusters],
    )


@router.post("/payouts", response_model=TxnReceipt)
async def payout(body: PayoutRequest, session: SessionDep, caller: CallerDep) -> TxnReceipt:
    """Withdraw settled earnings through the payout adapter (only your own earnings)."""
    amount = _amount(body.amount)
    key = payouts.client_key("payout", caller, body.idempotency_key)
    replayed = await ledger.get_by_key(session, key) is not None
    txn = await payouts.payout(session, PAYOUTS, caller, amount, key, time.time())
    account = core.earnings_account(caller)
    left = await ledger.balance(session, account)
    await session.commit()
    return _receipt(txn, account, left, replayed)


# --------------------------------------------------------------------------- public ledger


@dataclass
class _VerifyCache:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    seq: int = -1
    result: LedgerVerifyOut | None = None


_CACHES: dict[int, _VerifyCache] = {}


@router.get("/ledger/verify", response_model=LedgerVerifyOut, tags=["ledger"])
async def verify(session: SessionDep, state: StateDep) -> LedgerVerifyOut:
    """Recompute the whole hash chain and every invariant (public; cached per head)."""
    cache = _CACHES.setdefault(id(state), _VerifyCache())
    async with cache.lock:
        head = await session.scalar(select(LedgerHead.seq))
        if cache.result is not None and head == cache.seq:
            return cache.result
        result = await ledger.verify(session)
        out = LedgerVerifyOut(
            ok=result.ok,
            count=result.count,
            last_seq=result.last_seq,
            head_hash=result.head_hash,
            minted=format_credits(result.minted_micro),
            total=format_credits(result.total_micro),
            failure=result.failure,
        )
        if result.ok:
            cache.seq, cache.result = result.last_seq, out
        return out


@router.get("/ledger/transactions", response_model=list[LedgerTxnOut], tags=["ledger"])
async def transactions(
    session: SessionDep,
    after: int = Query(default=0, ge=0, le=MAX_SEQ, description="transactions with seq > after"),
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[LedgerTxnOut]:
    """The chain itself, in seq order (public): page with `after` = the last seq seen."""
    txns = await ledger.transactions(session, after=after, limit=limit)
    return [
        LedgerTxnOut(
            seq=t.seq,
            kind=t.kind,
            idempotency_key=t.idempotency_key,
            created_at=t.created_at,
            meta=dict(t.meta),
            entries=[
                LedgerEntryOut(account=a, amount_micro=str(m), amount=format_credits(m))
                for a, m in t.entries
            ],
            prev_hash=t.prev_hash,
            hash=t.hash,
        )
        for t in txns
    ]


# --------------------------------------------------------------------------- market


def _offer(o: Offer) -> OfferOut:
    return OfferOut(
        node_id=o.node_id,
        node_name=o.node_name,
        gpu=o.model,
        gpus=o.count,
        vram_gb=round(o.vram_gb, 2),
        cpus=o.cpus,
        ram_gb=round(o.ram_gb, 2),
        region=o.region,
        country=o.country,
        price=format_credits(o.price_micro),
        reliability=o.reliability,
        verified=o.verified,
        security=o.security.slug,
        connectivity=o.connectivity.slug,
    )


@router.get("/offers", response_model=list[OfferOut], tags=["market"])
async def offers(
    session: SessionDep,
    state: StateDep,
    _caller: CallerDep,
    q: str = Query(default="", max_length=4096, description="e.g. gpu=rtx4090 price<=0.4"),
    sort: str = Query(default="price", max_length=32),
    limit: int = Query(default=100, ge=1, le=market.MAX_OFFERS),
) -> list[OfferOut]:
    """Live offers from connected, placeable nodes that match the query."""
    found = await market.search(
        session,
        q,
        sort=sort,
        limit=limit,
        connected=state.hub.present,
        index=state.placement,
    )
    return [_offer(o) for o in found]


def _pct(value: object) -> str | None:
    return None if value is None else str(value)


@router.post("/quote", response_model=QuoteOut, tags=["market"])
async def quote(
    body: QuoteRequest, session: SessionDep, state: StateDep, _caller: CallerDep
) -> QuoteOut:
    """What `cluster up` with this spec would cost now, against cloud list prices."""
    spec = cluster_service.parse_user_spec(body.spec)
    result = await market.quote_spec(
        session,
        spec,
        connected=state.hub.present,
        require_verified=state.settings.require_verified,
        index=state.placement,
    )
    q, cmp = result.quote, result.quote.comparison
    hyper_hourly = None
    if cmp is not None and cmp.hyperscaler_median_micro is not None:
        hyper_hourly = format_credits(cmp.hyperscaler_median_micro * q.devices)
    return QuoteOut(
        model=result.model,
        devices=q.devices,
        duration_s=q.duration_s,
        price_per_hour=format_credits(q.hourly_micro),
        total=format_credits(q.total_micro),
        escrow=format_credits(result.escrow_micro),
        members=[
            QuoteMemberOut(
                node_id=m.node_id,
                role=m.role,
                model=m.model,
                units=m.units,
                price=format_credits(m.price_micro),
                region=m.region,
            )
            for m in result.plan.members
        ],
        hyperscaler_price_per_hour=hyper_hourly,
        hyperscaler_total=(
            None
            if q.hyperscaler_median_total_micro is None
            else format_credits(q.hyperscaler_median_total_micro)
        ),
        saving_pct=_pct(cmp.saving_vs_hyperscaler_median_pct) if cmp else None,
        cheapest_cloud=cmp.cheapest_cloud_provider if cmp else None,
        cheapest_cloud_price=format_credits(cmp.cheapest_cloud_micro) if cmp else None,
        saving_vs_cheapest_pct=_pct(cmp.saving_vs_cheapest_cloud_pct) if cmp else None,
        references=[
            CloudPriceOut(
                provider=r.provider,
                price=str(r.usd_per_gpu_hour),
                instance=r.instance,
                region=r.region,
                as_of=r.as_of,
                source=r.source,
            )
            for r in (cmp.references if cmp else ())
        ],
    )
