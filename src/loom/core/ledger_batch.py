"""Sealing a batch of transfers at once, as pure rules (issue 11 §6).

A sequencer appends many transfers in one database transaction. This module decides,
without I/O, what each of them becomes: given the chain's head, the current balances of
every account the batch touches, and the transactions already stored under the batch's
idempotency keys, `seal_batch` walks the requests in order and returns, for each one,
either its sealed :class:`~loom.core.ledger.Transaction` or the :class:`LedgerError` that
refuses it. A refused request changes nothing (its balances are left as they were, no seq
is used), so it fails only itself; the next request chains on the last accepted one.

Idempotency inside a batch works as across batches: a request whose key is already stored
(or sealed earlier in the same batch) with the same movement returns that transaction
(``replayed``); with a different movement it is an :class:`IdempotencyConflict`.

The result is exactly what posting the accepted requests one by one would have produced,
which is what the hypothesis tests check against a simple model.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

from loom.core.ledger import (
    MAY_GO_NEGATIVE,
    Entry,
    IdempotencyConflict,
    InsufficientFunds,
    LedgerError,
    Transaction,
    build_transaction,
    canonical_entries,
    same_request,
)

#: No balance may leave ±2^62 micro-credits (a BIGINT column holds 2^63): refuse, don't overflow.
BALANCE_LIMIT = 1 << 62


class KeyConflict(IdempotencyConflict):
    """The request's idempotency key is already stored for a different movement."""

    def __init__(self, key: str, existing_kind: str) -> None:
        self.key = key
        self.existing_kind = existing_kind
        super().__init__(
            f"idempotency key {key!r} was already used for a different {existing_kind}"
        )


class BalanceLimitExceeded(LedgerError):
    """Applying a transaction would take an account beyond :data:`BALANCE_LIMIT`."""

    def __init__(self, account: str) -> None:
        self.account = account
        super().__init__(f"{account} would exceed the ledger's balance limit")


@dataclass(frozen=True, slots=True)
class Request:
    """One transfer to seal. Accounts and key as the chain will hold them (public names)."""

    kind: str
    key: str
    entries: tuple[Entry, ...]
    meta: Mapping[str, str]

    @staticmethod
    def of(
        kind: str, key: str, entries: Sequence[Entry | tuple[str, int]], meta: Mapping[str, str]
    ) -> Request:
        return Request(kind, key, canonical_entries(entries), dict(meta))


@dataclass(frozen=True, slots=True)
class Sealed:
    """A request's outcome: its transaction; ``replayed`` when it was already stored."""

    txn: Transaction
    replayed: bool


Outcome = Sealed | LedgerError


@dataclass
class BatchResult:
    outcomes: list[Outcome]
    #: the new transactions, in seq order (what to insert)
    appended: list[Transaction] = field(default_factory=list)
    head_seq: int = 0
    head_hash: str = ""
    #: the balances after the batch, for every account the appended transactions touch
    balances: dict[str, int] = field(default_factory=dict)


def seal_batch(
    head_seq: int,
    head_hash: str,
    balances: Mapping[str, int],
    requests: Sequence[Request],
    stored: Mapping[str, Transaction],
    created_at: int,
) -> BatchResult:
    """Seal ``requests`` in order on top of (head_seq, head_hash).

    ``balances`` holds the current balance of every account the requests name (missing
    accounts count as 0); ``stored`` maps the requests' keys to transactions already in
    the chain. Neither is modified.
    """
    working: dict[str, int] = dict(balances)
    by_key: dict[str, Transaction] = dict(stored)
    result = BatchResult(outcomes=[], head_seq=head_seq, head_hash=head_hash)
    seq, head = head_seq, head_hash
    for req in requests:
        outcome = _one(req, seq, head, working, by_key, created_at)
        result.outcomes.append(outcome)
        if isinstance(outcome, Sealed) and not outcome.replayed:
            txn = outcome.txn
            by_key[txn.idempotency_key] = txn
            result.appended.append(txn)
            seq, head = txn.seq, txn.hash
    result.head_seq, result.head_hash = seq, head
    touched = {a for t in result.appended for a, _ in t.entries}
    result.balances = {a: working.get(a, 0) for a in touched}
    return result


def _one(
    req: Request,
    seq: int,
    head: str,
    working: MutableMapping[str, int],
    by_key: Mapping[str, Transaction],
    created_at: int,
) -> Outcome:
    existing = by_key.get(req.key)
    if existing is not None:
        if same_request(existing, req.kind, req.entries, req.meta):
            return Sealed(existing, replayed=True)
        return KeyConflict(req.key, existing.kind)
    try:
        txn = build_transaction(head, seq + 1, req.kind, req.key, req.entries, req.meta, created_at)
    except LedgerError as exc:
        return exc
    deltas: dict[str, int] = {}
    for account, amount in txn.entries:
        deltas[account] = deltas.get(account, 0) + amount
    for account, delta in deltas.items():
        now = working.get(account, 0)
        after = now + delta
        if after < 0 and account not in MAY_GO_NEGATIVE:
            return InsufficientFunds(account, now, -after)
        if abs(after) > BALANCE_LIMIT:
            return BalanceLimitExceeded(account)
    for account, delta in deltas.items():
        working[account] = working.get(account, 0) + delta
    return Sealed(txn, replayed=False)
