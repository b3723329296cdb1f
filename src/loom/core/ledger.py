"""The money plane's double-entry ledger, as pure rules (DESIGN.md §2, docs/ledger.md).

Accounts (all balances are integer micro-credits):

* ``system:faucet`` — the mint. Deposits are drawn from it, so its balance is minus the
  credit ever minted. It is the **only** account allowed below zero.
* ``system:fees`` — platform fees taken at settlement.
* ``user:<pubkey>`` — a key's spendable balance (pubkey = 64 lower-case hex, Ed25519).
* ``escrow:<cluster_id>`` — credit held for one cluster, owned by the user who funded it.
* ``earnings:<pubkey>`` — a supplier owner's settled earnings, withdrawable by payout.
  Kept apart from ``user:`` so that what a supplier earned is never mixed with what it
  deposited; both can belong to the same key.
* ``payout:<adapter>`` — a sink per payout adapter: credit that has left Loom.

Every transaction's entries sum to zero, so the sum of all balances (faucet included) is
always zero. Each transaction is hash-chained to the previous one:
``hash = sha256(prev_hash_ascii || canonical_json(txn without hash))``.

Transaction kinds and their shapes (entries are sorted by account, one entry per account):

========  ===================================================================
deposit   ``system:faucet -a``, ``user:X +a``
hold      ``user:X -a``, ``escrow:C +a``
settle    ``escrow:C -(g)``, ``earnings:S_i +e_i`` (>= 1), ``system:fees +f`` (if f > 0);
          meta ``fee_bps`` required; ``f`` is the sum of per-supplier fees rounded down
refund    ``escrow:C -a``, ``user:X +a`` where X is the user who funded the escrow
payout    ``earnings:S -a``, ``payout:A +a``
========  ===================================================================
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from loom.core.metering import BPS_DENOMINATOR, fee_split
from loom.core.money import MAX_MICRO, format_credits

# --------------------------------------------------------------------------- accounts

FAUCET = "system:faucet"
FEES = "system:fees"
#: Accounts allowed to hold a negative balance.
MAY_GO_NEGATIVE = frozenset({FAUCET})

#: ``prev_hash`` of the first transaction (seq 1).
GENESIS_HASH = "0" * 64
FIRST_SEQ = 1
#: Version tag inside the canonical encoding; bump it if the encoding ever changes.
ENCODING_VERSION = 1

MAX_ENTRIES = 64
MAX_KEY_LEN = 200
MAX_META_ITEMS = 32
MAX_META_VALUE_LEN = 1024

DEPOSIT = "deposit"
HOLD = "hold"
SETTLE = "settle"
REFUND = "refund"
PAYOUT = "payout"
KINDS = frozenset({DEPOSIT, HOLD, SETTLE, REFUND, PAYOUT})

_PUBKEY = r"[0-9a-f]{64}"
_ACCOUNT_RE = re.compile(
    rf"(?:system:(?:faucet|fees)|user:{_PUBKEY}|earnings:{_PUBKEY}"
    r"|escrow:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}|payout:[a-z0-9][a-z0-9_-]{0,31})"
)
_PUBKEY_RE = re.compile(_PUBKEY)
KEY_RE = re.compile(rf"[!-~]{{1,{MAX_KEY_LEN}}}")
_META_KEY_RE = re.compile(r"[a-z0-9_.-]{1,64}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_BPS_RE = re.compile(r"0|[1-9][0-9]{0,4}")


class LedgerError(ValueError):
    """A transaction or entry list that breaks the ledger's rules."""


class InsufficientFunds(LedgerError):
    """Applying a transaction would take an account below zero."""

    def __init__(self, account: str, balance_micro: int, shortfall_micro: int) -> None:
        self.account = account
        self.balance_micro = balance_micro
        self.shortfall_micro = shortfall_micro
        super().__init__(
            f"insufficient funds in {account}: balance {format_credits(balance_micro)} credits, "
            f"short by {format_credits(shortfall_micro)} credits"
        )


class IdempotencyConflict(LedgerError):
    """An idempotency key was reused for a different request."""


def _check_pubkey(pubkey: str) -> str:
    if not isinstance(pubkey, str) or not _PUBKEY_RE.fullmatch(pubkey):
        raise LedgerError(f"invalid public key {pubkey!r}: expected 64 lower-case hex digits")
    return pubkey


def user_account(pubkey: str) -> str:
    return f"user:{_check_pubkey(pubkey)}"


def earnings_account(pubkey: str) -> str:
    return f"earnings:{_check_pubkey(pubkey)}"


def escrow_account(cluster_id: str) -> str:
    account = f"escrow:{cluster_id}"
    if not _ACCOUNT_RE.fullmatch(account):
        raise LedgerError(f"invalid cluster id {cluster_id!r}: use 1-64 of [A-Za-z0-9_.-]")
    return account


def payout_account(adapter: str) -> str:
    account = f"payout:{adapter}"
    if not _ACCOUNT_RE.fullmatch(account):
        raise LedgerError(f"invalid payout adapter {adapter!r}: use 1-32 of [a-z0-9_-]")
    return account


def is_valid_account(account: str) -> bool:
    return isinstance(account, str) and _ACCOUNT_RE.fullmatch(account) is not None


def account_kind(account: str) -> str:
    """The part before the colon: ``system``, ``user``, ``escrow``, ``earnings``, ``payout``."""
    return account.partition(":")[0]


# --------------------------------------------------------------------------- types


class Entry(NamedTuple):
    """One leg of a transaction: a signed amount on one account (+ credit, - debit)."""

    account: str
    amount_micro: int


@dataclass(frozen=True, slots=True)
class Transaction:
    """One sealed ledger transaction. ``created_at`` is unix **microseconds**, passed in.

    ``entries`` are in canonical order (sorted by account, one per account). Persist every
    field; ``meta`` is a flat ``str -> str`` mapping.
    """

    seq: int
    kind: str
    idempotency_key: str
    entries: tuple[Entry, ...]
    meta: Mapping[str, str]
    created_at: int
    prev_hash: str
    hash: str


_ENCODE = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def canonical_bytes(
    seq: int,
    kind: str,
    idempotency_key: str,
    entries: Sequence[Entry],
    meta: Mapping[str, str],
    created_at: int,
    prev_hash: str,
) -> bytes:
    """The canonical encoding of a transaction without its hash.

    Compact JSON (``,`` and ``:`` separators, no spaces), keys sorted, UTF-8, no floats;
    entries as ``[[account, amount], ...]`` in the order given (canonical: by account).
    """
    body = {"v": ENCODING_VERSION, "seq": seq, "kind": kind, "key": idempotency_key}
    body.update(entries=entries, meta=meta, created_at=created_at, prev_hash=prev_hash)
    return _ENCODE(body).encode("utf-8")


def compute_hash(
    seq: int,
    kind: str,
    idempotency_key: str,
    entries: Sequence[Entry],
    meta: Mapping[str, str],
    created_at: int,
    prev_hash: str,
) -> str:
    """``sha256(prev_hash as ASCII || canonical_bytes(...))`` as lower-case hex."""
    body = canonical_bytes(seq, kind, idempotency_key, entries, meta, created_at, prev_hash)
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


def txn_hash(txn: Transaction) -> str:
    """Recompute a transaction's hash from its fields (ignores ``txn.hash``)."""
    t = txn
    return compute_hash(
        t.seq, t.kind, t.idempotency_key, t.entries, t.meta, t.created_at, t.prev_hash
    )


# --------------------------------------------------------------------------- rules


def entries_problem(entries: tuple[Entry, ...], known: Mapping[str, int] | None) -> str | None:
    """Why ``entries`` break the generic rules, or None. ``known`` accounts skip the regex."""
    n = len(entries)
    if n < 2:
        return f"a transaction needs at least 2 entries, got {n}"
    if n > MAX_ENTRIES:
        return f"too many entries: {n} > {MAX_ENTRIES}"
    total = 0
    previous = ""
    for entry in entries:
        if type(entry) is not Entry:
            return f"entry {entry!r} is not an Entry"
        account, amount = entry
        if type(amount) is not int:
            return f"amount on {account!r} must be an int, got {type(amount).__name__}"
        if amount == 0:
            return f"zero entry on {account}"
        if amount > MAX_MICRO or amount < -MAX_MICRO:
            return f"amount on {account} out of bounds: |{amount}| > {MAX_MICRO}"
        if not (known is not None and account in known) and not is_valid_account(account):
            return f"invalid account {account!r}"
        if account <= previous:
            return f"entries not in canonical order (sorted by account, unique) at {account}"
        previous = account
        total += amount
    if total != 0:
        return f"entries sum to {total} micro-credits, not zero"
    return None


def _two_leg(entries: tuple[Entry, ...], debit: str, credit: str) -> str | None:
    if len(entries) != 2:
        return f"expected 2 entries ({debit}- -> {credit}+), got {len(entries)}"
    (a, x), (b, y) = entries
    if x < 0 and a.startswith(debit) and y > 0 and b.startswith(credit):
        return None
    if y < 0 and b.startswith(debit) and x > 0 and a.startswith(credit):
        return None
    return f"expected a debit on {debit}* and a credit on {credit}*"


def _settle_shape(entries: tuple[Entry, ...], meta: Mapping[str, str]) -> str | None:
    bps_text = meta.get("fee_bps")
    if (
        type(bps_text) is not str
        or not _BPS_RE.fullmatch(bps_text)
        or int(bps_text) > BPS_DENOMINATOR
    ):
        return f"settle needs meta fee_bps as an integer 0..{BPS_DENOMINATOR}"
    fee_bps = int(bps_text)
    gross = 0
    fee = 0
    suppliers = 0
    escrows = 0
    for account, amount in entries:
        if amount < 0:
            if not account.startswith("escrow:"):
                return f"settle may only debit an escrow account, not {account}"
            escrows += 1
            gross = -amount
        elif account == FEES:
            fee = amount
        elif account.startswith("earnings:"):
            suppliers += 1
        else:
            return f"settle may only credit earnings:* and {FEES}, not {account}"
    if escrows != 1 or suppliers < 1:
        return "settle needs exactly one escrow debit and at least one earnings credit"
    # The fee is a sum of per-supplier floors, so it lies in [floor(g*b) - (n-1), floor(g*b)].
    ceiling = gross * fee_bps // BPS_DENOMINATOR
    if fee > ceiling or fee < ceiling - (suppliers - 1):
        return f"settle fee {fee} does not match fee_bps {fee_bps} on {gross} micro-credits"
    return None


def shape_problem(kind: str, entries: tuple[Entry, ...], meta: Mapping[str, str]) -> str | None:
    if kind == SETTLE:
        return _settle_shape(entries, meta)
    if kind == DEPOSIT:
        return _two_leg(entries, FAUCET, "user:")
    if kind == HOLD:
        return _two_leg(entries, "user:", "escrow:")
    if kind == REFUND:
        return _two_leg(entries, "escrow:", "user:")
    if kind == PAYOUT:
        return _two_leg(entries, "earnings:", "payout:")
    return f"unknown transaction kind {kind!r}; known: {', '.join(sorted(KINDS))}"


def meta_problem(meta: Mapping[str, str]) -> str | None:
    if not isinstance(meta, Mapping):
        return "meta must be a mapping of str to str"
    if len(meta) > MAX_META_ITEMS:
        return f"too many meta items: {len(meta)} > {MAX_META_ITEMS}"
    for key, value in meta.items():
        if not isinstance(key, str) or not _META_KEY_RE.fullmatch(key):
            return f"invalid meta key {key!r}: use 1-64 of [a-z0-9_.-]"
        if type(value) is not str:
            return f"meta {key} must be a string, got {type(value).__name__}"
        if len(value) > MAX_META_VALUE_LEN:
            return f"meta {key} longer than {MAX_META_VALUE_LEN} characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"meta {key} is not valid Unicode text"
    return None


def check_entries(entries: Iterable[Entry], kind: str, meta: Mapping[str, str]) -> None:
    """Raise LedgerError unless ``entries`` (in canonical order) fit the rules of ``kind``."""
    items = tuple(entries)
    problem = entries_problem(items, None) or shape_problem(kind, items, meta)
    if problem:
        raise LedgerError(problem)


def canonical_entries(entries: Iterable[Entry | tuple[str, int]]) -> tuple[Entry, ...]:
    """Entries sorted by account (how they are hashed). Use it on rows read from a database."""
    if type(entries) is tuple and _already_canonical(entries):
        return entries  # the common case on the posting path: nothing to rebuild
    return tuple(sorted(Entry(account, amount) for account, amount in entries))


def _already_canonical(entries: tuple[Entry | tuple[str, int], ...]) -> bool:
    previous: Entry | None = None
    for entry in entries:
        if type(entry) is not Entry or (previous is not None and not previous < entry):
            return False
        previous = entry
    return True


def build_transaction(
    prev: Transaction | str | None,
    seq: int,
    kind: str,
    idempotency_key: str,
    entries: Iterable[Entry | tuple[str, int]],
    meta: Mapping[str, str] | None,
    created_at: int,
) -> Transaction:
    """Validate and seal the next transaction.

    ``prev`` is the previous transaction, its hash, or None for the first one (seq 1).
    Balances are not checked here: call :func:`apply` on the balances first.
    """
    if prev is None:
        prev_hash = GENESIS_HASH
        if seq != FIRST_SEQ:
            raise LedgerError(f"the first transaction must have seq {FIRST_SEQ}, got {seq}")
    elif isinstance(prev, Transaction):
        prev_hash = prev.hash
        if seq != prev.seq + 1:
            raise LedgerError(f"seq {seq} does not follow previous seq {prev.seq}")
    else:
        prev_hash = prev
    if not _HASH_RE.fullmatch(prev_hash):
        raise LedgerError(f"invalid prev_hash {prev_hash!r}")
    if type(seq) is not int or seq < FIRST_SEQ:
        raise LedgerError(f"seq must be an int >= {FIRST_SEQ}, got {seq!r}")
    if type(created_at) is not int or created_at < 0:
        raise LedgerError(f"created_at must be a non-negative int (unix µs), got {created_at!r}")
    if not isinstance(idempotency_key, str) or not KEY_RE.fullmatch(idempotency_key):
        raise LedgerError(
            f"invalid idempotency key {idempotency_key!r}: 1-{MAX_KEY_LEN} printable ASCII, "
            "no spaces"
        )
    meta_dict = dict(meta or {})
    canon = canonical_entries(entries)
    problem = (
        meta_problem(meta_dict)
        or entries_problem(canon, None)
        or shape_problem(kind, canon, meta_dict)
    )
    if problem:
        raise LedgerError(problem)
    digest = compute_hash(seq, kind, idempotency_key, canon, meta_dict, created_at, prev_hash)
    return Transaction(seq, kind, idempotency_key, canon, meta_dict, created_at, prev_hash, digest)


def apply(balances: MutableMapping[str, int], txn: Transaction | Iterable[Entry]) -> None:
    """Apply a transaction's entries to ``balances`` in place, atomically.

    Raises :class:`InsufficientFunds` (and changes nothing) if any account other than
    those in :data:`MAY_GO_NEGATIVE` would end below zero. Missing accounts count as 0.
    """
    deltas: dict[str, int] = {}
    for account, amount in txn.entries if isinstance(txn, Transaction) else txn:
        deltas[account] = deltas.get(account, 0) + amount
    for account, delta in deltas.items():
        balance = balances.get(account, 0)
        if balance + delta < 0 and account not in MAY_GO_NEGATIVE:
            raise InsufficientFunds(account, balance, -(balance + delta))
    for account, delta in deltas.items():
        balances[account] = balances.get(account, 0) + delta


def same_request(
    existing: Transaction,
    kind: str,
    entries: Iterable[Entry | tuple[str, int]],
    meta: Mapping[str, str] | None,
) -> bool:
    """Whether a retry with ``existing``'s idempotency key asks for the same movement."""
    return (
        existing.kind == kind
        and existing.entries == canonical_entries(entries)
        and dict(existing.meta) == dict(meta or {})
    )


# --------------------------------------------------------------------------- entry builders


def _positive(name: str, amount: int) -> int:
    if type(amount) is not int or amount <= 0 or amount > MAX_MICRO:
        raise LedgerError(f"{name} must be an int in 1..{MAX_MICRO} micro-credits, got {amount!r}")
    return amount


def deposit_entries(user_pubkey: str, amount_micro: int) -> tuple[Entry, ...]:
    """Mint ``amount`` from the faucet into a user's balance."""
    a = _positive("deposit amount", amount_micro)
    return canonical_entries([Entry(FAUCET, -a), Entry(user_account(user_pubkey), a)])


def hold_entries(user_pubkey: str, cluster_id: str, amount_micro: int) -> tuple[Entry, ...]:
    """Move ``amount`` from a user's balance into a cluster's escrow."""
    a = _positive("hold amount", amount_micro)
    return canonical_entries(
        [Entry(user_account(user_pubkey), -a), Entry(escrow_account(cluster_id), a)]
    )


def settle_entries(
    cluster_id: str, gross_by_supplier: Mapping[str, int], fee_bps: int
) -> tuple[Entry, ...]:
    """Pay suppliers out of a cluster's escrow, minus the platform fee.

    ``gross_by_supplier`` maps supplier owner pubkeys to what they earned (micro-credits,
    zeros skipped). Each supplier's fee is ``floor(gross * fee_bps / 10000)`` (rounds down,
    in the supplier's favour); fees are summed into one ``system:fees`` credit. Put
    ``{"fee_bps": str(fee_bps)}`` in the transaction's meta (see :func:`settle_meta`).
    """
    total_gross = 0
    total_fee = 0
    legs: list[Entry] = []
    for pubkey, gross in gross_by_supplier.items():
        if type(gross) is not int or gross < 0:
            raise LedgerError(f"gross for supplier {pubkey} must be a non-negative int")
        if gross == 0:
            continue
        to_supplier, fee = fee_split(gross, fee_bps)
        total_gross += gross
        total_fee += fee
        if to_supplier:
            legs.append(Entry(earnings_account(pubkey), to_supplier))
    if total_gross == 0:
        raise LedgerError("nothing to settle: every supplier's gross is zero")
    _positive("settlement", total_gross)
    if not legs:
        raise LedgerError("a settlement must pay at least one supplier (fee_bps is 100 %?)")
    legs.append(Entry(escrow_account(cluster_id), -total_gross))
    if total_fee:
        legs.append(Entry(FEES, total_fee))
    return canonical_entries(legs)


def settle_meta(fee_bps: int, **extra: str) -> dict[str, str]:
    """Meta for a settle transaction: ``fee_bps`` plus any extra string fields."""
    return {"fee_bps": str(fee_bps), **extra}


def refund_entries(cluster_id: str, user_pubkey: str, amount_micro: int) -> tuple[Entry, ...]:
    """Return what is left in a cluster's escrow to the user who funded it."""
    a = _positive("refund amount", amount_micro)
    return canonical_entries(
        [Entry(escrow_account(cluster_id), -a), Entry(user_account(user_pubkey), a)]
    )


def payout_entries(supplier_pubkey: str, adapter: str, amount_micro: int) -> tuple[Entry, ...]:
    """Withdraw settled earnings through a payout adapter (credit leaves Loom)."""
    a = _positive("payout amount", amount_micro)
    return canonical_entries(
        [Entry(earnings_account(supplier_pubkey), -a), Entry(payout_account(adapter), a)]
    )
