"""Appending to the ledger in the database: one transfer (`post`) or a batch (`seal`).

Both run inside the caller's DB transaction (the caller commits) and start by locking the
single `ledger_head` row — `SELECT … FOR UPDATE` on PostgreSQL; on SQLite a no-op UPDATE
of that row, which takes the database's one write lock before anything is read — so
appends are serialized and nothing is decided on a stale head or balance, whoever
appends: the sequencer's batches (`ledger_sequencer`), settlement's posts that commit with
metering state, and any other replica.

`seal` does a batch in a fixed number of round trips whatever its size: lock the head,
look the aliases, the secret and the stored idempotency keys up, read the balances, decide
every transfer in memory (`loom.core.ledger_batch.seal_batch`: a refused transfer fails
only itself), then insert the transactions, their entries and new balances, update the
others and the head, each with one multi-row statement. `post` is `seal` of one transfer
that raises its refusal.

Private account names (``user:<key>``, ``escrow:<cluster>``) and idempotency keys enter
the chain as pseudonyms (`ledger_privacy`); every function here takes and returns the
private names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, String, Table, any_, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import (
    AccountBalance,
    LedgerAlias,
    LedgerEntry,
    LedgerHead,
    LedgerTransaction,
)
from loom.coordinator.errors import BadRequest, Conflict, PaymentRequired, ServiceError
from loom.coordinator.services import ledger_privacy as privacy
from loom.core import ledger as core
from loom.core import ledger_batch as batch
from loom.core.ledger import Entry, Transaction
from loom.core.money import format_credits

HEAD_ID = 1
BALANCE_LIMIT = batch.BALANCE_LIMIT
# Core tables: multi-row statements without the ORM's per-row bookkeeping.
_TXNS = cast(Table, LedgerTransaction.__table__)
_ENTRIES = cast(Table, LedgerEntry.__table__)
_BALANCES = cast(Table, AccountBalance.__table__)
#: The most transfers, and entries, one `seal` takes (every IN-list stays far below the
#: drivers' 32,767 parameters).
MAX_BATCH = 1000
MAX_LEGS = 8000


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


def _among(session: AsyncSession, column: Any, values: Sequence[str]) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``= ANY(:array)``: one parameter, not one each
    (rendering and binding hundreds of IN parameters per batch costs more than the query)."""
    if _dialect(session) == "postgresql":
        return cast(
            ColumnElement[bool],
            column == any_(bindparam("among", list(values), type_=ARRAY(String()))),
        )
    return cast(ColumnElement[bool], column.in_(list(values)))


async def lock_head(session: AsyncSession) -> tuple[int, str]:
    """Take the ledger's lock for the rest of the caller's DB transaction; (seq, hash).

    Call it before reading anything the decision depends on (balances, meters).
    """
    if _dialect(session) == "sqlite":
        # The first write of the transaction: SQLite's write lock is taken (waiting up to
        # busy_timeout) before the SELECT below reads, so the head cannot move under us.
        await session.execute(
            update(LedgerHead).where(LedgerHead.id == HEAD_ID).values(seq=LedgerHead.seq)
        )
        row = (
            await session.execute(
                select(LedgerHead.seq, LedgerHead.hash).where(LedgerHead.id == HEAD_ID)
            )
        ).one()
    else:
        row = (
            await session.execute(
                select(LedgerHead.seq, LedgerHead.hash)
                .where(LedgerHead.id == HEAD_ID)
                .with_for_update()
            )
        ).one()
    return int(row[0]), str(row[1])


def meta_text(meta: Mapping[str, str]) -> str:
    if not meta:
        return "{}"
    return json.dumps(dict(meta), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def meta_of(text: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"_unreadable": text[:64]}
    if not isinstance(value, dict):
        return {"_unreadable": text[:64]}
    return value


TXN_COLUMNS = (
    LedgerTransaction.seq,
    LedgerTransaction.kind,
    LedgerTransaction.idempotency_key,
    LedgerTransaction.created_at,
    LedgerTransaction.meta_json,
    LedgerTransaction.prev_hash,
    LedgerTransaction.hash,
)
TxnRow = Sequence[Any]


def txn_of(row: TxnRow, entries: Iterable[tuple[str, int]]) -> Transaction:
    seq, kind, key, created_at, meta_json, prev_hash, digest = row
    return Transaction(
        seq=int(seq),
        kind=kind,
        idempotency_key=key,
        entries=core.canonical_entries(entries),
        meta=meta_of(meta_json),
        created_at=int(created_at),
        prev_hash=prev_hash,
        hash=digest,
    )


@dataclass(frozen=True, slots=True)
class Transfer:
    """One movement to append, under private names; ``key`` is the caller's own key."""

    kind: str
    key: str
    entries: tuple[Entry, ...]
    meta: Mapping[str, str]

    @staticmethod
    def of(
        kind: str,
        key: str,
        entries: Iterable[Entry | tuple[str, int]],
        meta: Mapping[str, str] | None = None,
    ) -> Transfer:
        return Transfer(kind, key, core.canonical_entries(entries), dict(meta or {}))


#: What `seal` returns per transfer: its transaction (private names), or its refusal.
Result = Transaction | ServiceError


def _invalid(problem: str) -> BadRequest:
    return BadRequest("invalid_transaction", problem)


def precheck(t: Transfer) -> ServiceError | None:
    """Refuse what breaks the ledger's rules before touching the database (no I/O).

    Every account is a valid name, amounts are ints, the key is printable: so one bad
    transfer can never make a batch's statements fail for the others.
    """
    if not isinstance(t.key, str) or not 1 <= len(t.key) <= 1000 or not t.key.isprintable():
        return BadRequest("invalid_transaction", f"invalid idempotency key {t.key!r}")
    problem = (
        core.meta_problem(t.meta)
        or core.entries_problem(t.entries, None)
        or core.shape_problem(t.kind, t.entries, t.meta)
    )
    return None if problem is None else _invalid(problem)


async def _secret(session: AsyncSession) -> str:
    query = select(LedgerAlias.alias).where(LedgerAlias.account == privacy.SECRET_ROW)
    value = await session.scalar(query)
    if value is None:
        await privacy.public_key(session, "k", create=True)  # draws the secret
        value = await session.scalar(query)
    return str(value)


async def _stored(session: AsyncSession, keys: Mapping[str, str]) -> dict[str, Transaction]:
    """Stored transactions by public key; ``keys`` maps each public key to the private one
    (a chain older than the secret holds the private key itself)."""
    wanted = set(keys) | set(keys.values())
    rows = list(
        await session.execute(
            select(*TXN_COLUMNS).where(
                _among(session, LedgerTransaction.idempotency_key, sorted(wanted))
            )
        )
    )
    if not rows:
        return {}
    entries: dict[int, list[tuple[str, int]]] = {}
    for seq, account, amount in await session.execute(
        select(LedgerEntry.txn_seq, LedgerEntry.account, LedgerEntry.amount_micro).where(
            LedgerEntry.txn_seq.in_([int(r[0]) for r in rows])
        )
    ):
        entries.setdefault(int(seq), []).append((str(account), int(amount)))
    by_stored_key = {str(r[2]): txn_of(r, entries.get(int(r[0]), ())) for r in rows}
    out: dict[str, Transaction] = {}
    for public, private in keys.items():
        found = by_stored_key.get(public) or by_stored_key.get(private)
        if found is not None:
            out[public] = found
    return out


async def seal(session: AsyncSession, transfers: Sequence[Transfer], now: float) -> list[Result]:
    """Append ``transfers`` in order inside the caller's DB transaction (caller commits).

    Returns one result per transfer: its transaction under private names (the stored one
    for a replayed key), or the ServiceError refusing it — Conflict (409) for a key used
    for a different movement, PaymentRequired (402) naming the shortfall, BadRequest (400)
    for a movement that breaks the ledger's rules. A refusal writes nothing of its own.
    """
    if len(transfers) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} transfers per seal, got {len(transfers)}")
    legs = sum(len(t.entries) for t in transfers)
    if legs > MAX_LEGS and len(transfers) > 1:
        raise ValueError(f"at most {MAX_LEGS} entries per seal, got {legs}")
    results: list[Result | None] = [precheck(t) for t in transfers]
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return [r for r in results if r is not None]
    seq, head = await lock_head(session)
    accounts = list(dict.fromkeys(a for i in todo for a, _ in transfers[i].entries))
    names = await privacy.public_names(session, accounts, create=True)
    back = {v: k for k, v in names.items()}
    secret = await _secret(session)
    public_keys = {i: privacy.hashed_key(secret, transfers[i].key) for i in todo}
    stored = await _stored(session, {public_keys[i]: transfers[i].key for i in todo})
    public_accounts = [names[a] for a in accounts]
    current = {
        str(a): int(b)
        for a, b in await session.execute(
            select(AccountBalance.account, AccountBalance.balance_micro).where(
                _among(session, AccountBalance.account, public_accounts)
            )
        )
    }
    requests = [
        batch.Request.of(
            transfers[i].kind,
            public_keys[i],
            [(names[a], m) for a, m in transfers[i].entries],
            transfers[i].meta,
        )
        for i in todo
    ]
    out = batch.seal_batch(seq, head, current, requests, stored, max(0, int(now * 1_000_000)))
    await _write(session, out, current)
    for i, outcome in zip(todo, out.outcomes, strict=True):
        if isinstance(outcome, batch.Sealed):
            txn = outcome.txn
            private = core.canonical_entries((back.get(a, a), m) for a, m in txn.entries)
            results[i] = Transaction(
                txn.seq,
                txn.kind,
                txn.idempotency_key,
                private,
                txn.meta,
                txn.created_at,
                txn.prev_hash,
                txn.hash,
            )
        else:
            results[i] = _refusal(outcome, transfers[i], back)
    return [r for r in results if r is not None]


async def _write(session: AsyncSession, out: batch.BatchResult, current: Mapping[str, int]) -> None:
    if not out.appended:
        return
    await session.execute(
        insert(_TXNS),
        [
            {
                "seq": t.seq,
                "kind": t.kind,
                "idempotency_key": t.idempotency_key,
                "created_at": t.created_at,
                "meta_json": meta_text(t.meta),
                "prev_hash": t.prev_hash,
                "hash": t.hash,
            }
            for t in out.appended
        ],
    )
    await session.execute(
        insert(_ENTRIES),
        [
            {"txn_seq": t.seq, "account": a, "amount_micro": m}
            for t in out.appended
            for a, m in t.entries
        ],
    )
    new = [{"account": a, "balance_micro": b} for a, b in out.balances.items() if a not in current]
    if new:
        await session.execute(insert(_BALANCES), new)
    changed = [
        {"a": a, "b": b} for a, b in out.balances.items() if a in current and current[a] != b
    ]
    if changed:
        await session.execute(
            update(_BALANCES)
            .where(_BALANCES.c.account == bindparam("a"))
            .values(balance_micro=bindparam("b")),
            changed,
        )
    await session.execute(
        update(LedgerHead)
        .where(LedgerHead.id == HEAD_ID)
        .values(seq=out.head_seq, hash=out.head_hash)
    )


def _refusal(error: core.LedgerError, t: Transfer, back: Mapping[str, str]) -> ServiceError:
    if isinstance(error, batch.KeyConflict):
        return Conflict(
            "idempotency_conflict",
            f"idempotency key {t.key!r} was already used for a different "
            f"{error.existing_kind}; use a new key for a new request",
        )
    if isinstance(error, core.InsufficientFunds):
        return PaymentRequired(
            "insufficient_funds",
            f"{back.get(error.account, error.account)} holds "
            f"{format_credits(error.balance_micro)} credits, short by "
            f"{format_credits(error.shortfall_micro)}",
        )
    if isinstance(error, batch.BalanceLimitExceeded):
        return BadRequest(
            "amount_too_large",
            f"{back.get(error.account, error.account)} would exceed the ledger's balance limit",
        )
    return _invalid(str(error))


async def post(
    session: AsyncSession,
    kind: str,
    key: str,
    entries: Iterable[Entry | tuple[str, int]],
    meta: Mapping[str, str] | None,
    now: float,
) -> Transaction:
    """Append one transaction (or return the stored one for a replayed key).

    The transaction comes back with its accounts under their private names; the chain
    (and the returned hash) holds their public aliases. Raises the refusal `seal` would
    return (nothing is written then).
    """
    (result,) = await seal(session, [Transfer.of(kind, key, entries, meta)], now)
    if isinstance(result, ServiceError):
        raise result
    return result
