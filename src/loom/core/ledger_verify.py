"""Ledger verification: re-check a whole hash-chained history, and an in-memory ledger.

`verify_chain` streams transactions (O(1) memory apart from balances) and reports the first
failure precisely; `MemoryLedger` is the reference posting flow the database service follows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from loom.core.ledger import (
    FAUCET,
    FIRST_SEQ,
    GENESIS_HASH,
    HOLD,
    KEY_RE,
    MAY_GO_NEGATIVE,
    REFUND,
    Entry,
    IdempotencyConflict,
    Transaction,
    apply,
    build_transaction,
    canonical_bytes,
    canonical_entries,
    entries_problem,
    meta_problem,
    same_request,
    shape_problem,
)
from loom.core.money import format_credits


@dataclass(frozen=True, slots=True)
class VerifyFailure:
    """The first problem found: the stream position (0-based), the seq read there, what."""

    index: int
    seq: int | None
    reason: str

    def __str__(self) -> str:
        return f"transaction #{self.index} (seq {self.seq}): {self.reason}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    count: int
    last_seq: int
    head_hash: str
    failure: VerifyFailure | None = None
    balances: dict[str, int] = field(default_factory=dict)

    @property
    def minted_micro(self) -> int:
        """Credit ever minted: minus the faucet's balance."""
        return -self.balances.get(FAUCET, 0)


def verify_chain(
    txns: Iterable[Transaction],
    *,
    start_seq: int = FIRST_SEQ,
    start_hash: str = GENESIS_HASH,
    start_balances: Mapping[str, int] | None = None,
    expected_head: str | None = None,
    check_keys: bool = True,
) -> VerifyReport:
    """Re-verify a chain from its first transaction (or from a trusted checkpoint).

    Streams ``txns`` once. Per transaction it checks: seq contiguity, the link to the
    previous hash, the recomputed hash, the kind and its entry shape, types, bounds, zero
    sum and canonical order of entries, that no account but the faucet ever goes negative,
    that refunds go to the user who funded the escrow, and (``check_keys``) idempotency
    key uniqueness. Memory: the balances, escrow owners, and the set of keys seen (turn
    ``check_keys`` off where the database enforces uniqueness and memory matters).
    Stops at the first failure, reported with its position, seq and reason.
    """
    balances: dict[str, int] = dict(start_balances or {})
    owners: dict[str, str] = {}
    keys: set[str] = set()
    expect = start_seq
    head = start_hash
    count = 0
    sha256 = hashlib.sha256
    encode = canonical_bytes
    key_match = KEY_RE.fullmatch
    may_go_negative = MAY_GO_NEGATIVE

    def fail(reason: str, seq: int | None) -> VerifyReport:
        return VerifyReport(
            False, count, expect - 1, head, VerifyFailure(count, seq, reason), balances
        )

    for txn in txns:
        try:
            seq = txn.seq
            if seq != expect or type(seq) is not int:
                return fail(f"seq {seq!r} where {expect} was expected", seq)
            if txn.prev_hash != head:
                return fail(f"prev_hash {txn.prev_hash!r} does not link to {head}", seq)
            kind = txn.kind
            entries = txn.entries
            meta = txn.meta
            created_at = txn.created_at
            if type(created_at) is not int or created_at < 0:
                return fail(f"created_at {created_at!r} is not a non-negative int", seq)
            key = txn.idempotency_key
            if type(key) is not str or not key_match(key):
                return fail(f"invalid idempotency key {key!r}", seq)
            problem = (
                (meta_problem(meta) if meta else None)
                or entries_problem(entries, balances)
                or shape_problem(kind, entries, meta)
            )
            if problem:
                return fail(problem, seq)
            body = encode(seq, kind, key, entries, meta, created_at, head)
            digest = sha256(head.encode("ascii") + body).hexdigest()
        except (AttributeError, TypeError, ValueError) as exc:
            return fail(f"malformed transaction: {exc}", getattr(txn, "seq", None))
        if digest != txn.hash:
            return fail(f"hash mismatch: stored {txn.hash!r}, recomputed {digest}", seq)
        if check_keys:
            if key in keys:
                return fail(f"idempotency key {key!r} used twice", seq)
            keys.add(key)
        if kind in (HOLD, REFUND):
            # Sorted by account: the escrow leg comes before the user leg in both kinds.
            escrow, user = entries[0][0], entries[1][0]
            owner = owners.setdefault(escrow, user)
            if owner != user:
                return fail(f"{escrow} belongs to {owner}, not {user}", seq)
        for account, amount in entries:
            balance = balances.get(account, 0) + amount
            if balance < 0 and account not in may_go_negative:
                return fail(
                    f"{account} would go negative: short by {format_credits(-balance)} credits",
                    seq,
                )
        for account, amount in entries:
            balances[account] = balances.get(account, 0) + amount
        head = txn.hash
        expect = seq + 1
        count += 1
    if expected_head is not None and head != expected_head:
        return fail(f"chain ends at {head}, expected head {expected_head}", None)
    return VerifyReport(True, count, expect - 1, head, None, balances)


# --------------------------------------------------------------------------- in memory


class MemoryLedger:
    """A complete ledger in memory: for tests, the simulator, and as the reference flow.

    ``post`` is what the coordinator's ledger service does inside one DB transaction:
    idempotency lookup, balance check, seal, append, update balances.
    """

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.txns: list[Transaction] = []
        self.by_key: dict[str, Transaction] = {}

    @property
    def head_hash(self) -> str:
        return self.txns[-1].hash if self.txns else GENESIS_HASH

    def post(
        self,
        kind: str,
        idempotency_key: str,
        entries: Iterable[Entry | tuple[str, int]],
        meta: Mapping[str, str] | None,
        created_at: int,
    ) -> Transaction:
        canon = canonical_entries(entries)
        existing = self.by_key.get(idempotency_key)
        if existing is not None:
            if same_request(existing, kind, canon, meta):
                return existing
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r} was used for a different {existing.kind}"
            )
        prev = self.txns[-1] if self.txns else None
        seq = prev.seq + 1 if prev else FIRST_SEQ
        txn = build_transaction(prev, seq, kind, idempotency_key, canon, meta, created_at)
        apply(self.balances, txn)
        self.txns.append(txn)
        self.by_key[idempotency_key] = txn
        return txn

    def balance(self, account: str) -> int:
        return self.balances.get(account, 0)
