"""Ledger rules: entries, builders, hash chain, verify_chain, and invariants under random use."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.core import ledger as lg
from loom.core import ledger_verify as lv
from loom.core.ledger import Entry, Transaction
from loom.core.money import MAX_MICRO, MICRO

ALICE = "a" * 64
BOB = "b" * 64
SUP1 = "1" * 64
SUP2 = "2" * 64
T0 = 1_790_000_000_000_000


def reseal(txns: Sequence[Transaction]) -> list[Transaction]:
    """Recompute links and hashes without any validation (what a forger would do)."""
    out: list[Transaction] = []
    prev = lg.GENESIS_HASH
    for t in txns:
        t = dataclasses.replace(t, prev_hash=prev)
        t = dataclasses.replace(t, hash=lg.txn_hash(t))
        out.append(t)
        prev = t.hash
    return out


def demo_chain() -> lv.MemoryLedger:
    led = lv.MemoryLedger()
    led.post(lg.DEPOSIT, "dep-a", lg.deposit_entries(ALICE, 100 * MICRO), {"ref": "x"}, T0)
    led.post(lg.DEPOSIT, "dep-b", lg.deposit_entries(BOB, 5 * MICRO), None, T0 + 1)
    led.post(lg.HOLD, "hold-1", lg.hold_entries(ALICE, "c1", 60 * MICRO), None, T0 + 2)
    led.post(
        lg.SETTLE,
        "settle-1",
        lg.settle_entries("c1", {SUP1: 30 * MICRO + 9, SUP2: 9}, 250),
        lg.settle_meta(250, period="1"),
        T0 + 3,
    )
    led.post(lg.REFUND, "refund-1", lg.refund_entries("c1", ALICE, 5 * MICRO), None, T0 + 4)
    led.post(lg.PAYOUT, "payout-1", lg.payout_entries(SUP1, "bank", 10 * MICRO), None, T0 + 5)
    return led


# --------------------------------------------------------------------------- accounts and builders


def test_account_helpers_validate() -> None:
    assert lg.user_account(ALICE) == f"user:{ALICE}"
    assert lg.earnings_account(SUP1) == f"earnings:{SUP1}"
    assert lg.escrow_account("c-1_x.y") == "escrow:c-1_x.y"
    assert lg.payout_account("bank") == "payout:bank"
    for bad in ("A" * 64, "a" * 63, "", "g" * 64):
        with pytest.raises(lg.LedgerError, match="public key"):
            lg.user_account(bad)
    with pytest.raises(lg.LedgerError, match="cluster id"):
        lg.escrow_account("has space")
    with pytest.raises(lg.LedgerError, match="adapter"):
        lg.payout_account("Bank")
    assert lg.account_kind(lg.FEES) == "system"
    assert not lg.is_valid_account("system:other")


def test_builders_produce_canonical_balanced_entries() -> None:
    dep = lg.deposit_entries(ALICE, 7)
    assert dep == (Entry(lg.FAUCET, -7), Entry(f"user:{ALICE}", 7))
    assert lg.hold_entries(ALICE, "c", 3) == (Entry("escrow:c", 3), Entry(f"user:{ALICE}", -3))
    assert lg.refund_entries("c", ALICE, 3) == (Entry("escrow:c", -3), Entry(f"user:{ALICE}", 3))
    assert lg.payout_entries(SUP1, "bank", 4) == (
        Entry(f"earnings:{SUP1}", -4),
        Entry("payout:bank", 4),
    )
    for bad in (0, -1, MAX_MICRO + 1, True, 1.5):
        with pytest.raises(lg.LedgerError):
            lg.deposit_entries(ALICE, bad)  # type: ignore[arg-type]


def test_settle_fee_rounds_down_per_supplier_and_conserves() -> None:
    # 10 % of 19 = 1.9 -> 1; 10 % of 9 = 0.9 -> 0
    entries = lg.settle_entries("c", {SUP1: 19, SUP2: 9, "3" * 64: 0}, 1000)
    as_dict = dict(entries)
    assert as_dict == {
        "escrow:c": -28,
        f"earnings:{SUP1}": 18,
        f"earnings:{SUP2}": 9,
        lg.FEES: 1,
    }
    assert sum(as_dict.values()) == 0
    # no fee leg when the fee is zero
    assert lg.FEES not in dict(lg.settle_entries("c", {SUP1: 5}, 0))
    with pytest.raises(lg.LedgerError, match="nothing to settle"):
        lg.settle_entries("c", {SUP1: 0}, 100)
    with pytest.raises(lg.LedgerError, match="at least one supplier"):
        lg.settle_entries("c", {SUP1: 5}, 10_000)
    with pytest.raises(ValueError, match="fee_bps"):
        lg.settle_entries("c", {SUP1: 5}, 10_001)


# --------------------------------------------------------------------------- build_transaction


def test_build_transaction_links_and_hashes() -> None:
    t1 = lg.build_transaction(None, 1, lg.DEPOSIT, "k1", lg.deposit_entries(ALICE, 5), {}, T0)
    assert t1.prev_hash == lg.GENESIS_HASH
    assert t1.hash == lg.txn_hash(t1)
    t2 = lg.build_transaction(t1, 2, lg.HOLD, "k2", lg.hold_entries(ALICE, "c", 5), None, T0)
    assert t2.prev_hash == t1.hash
    t2b = lg.build_transaction(t1.hash, 2, lg.HOLD, "k2", lg.hold_entries(ALICE, "c", 5), {}, T0)
    assert t2b == t2
    # entries given out of order are stored sorted
    rev = tuple(reversed(lg.deposit_entries(ALICE, 5)))
    assert lg.build_transaction(None, 1, lg.DEPOSIT, "k1", rev, {}, T0) == t1
    with pytest.raises(lg.LedgerError, match="follow"):
        lg.build_transaction(t1, 3, lg.DEPOSIT, "k3", lg.deposit_entries(ALICE, 5), {}, T0)
    with pytest.raises(lg.LedgerError, match="first transaction"):
        lg.build_transaction(None, 2, lg.DEPOSIT, "k3", lg.deposit_entries(ALICE, 5), {}, T0)


def test_canonical_encoding_is_pinned() -> None:
    body = lg.canonical_bytes(
        1, "deposit", "k1", lg.deposit_entries(ALICE, 5), {"note": "é"}, 7, lg.GENESIS_HASH
    )
    expected = (
        '{"created_at":7,"entries":[["system:faucet",-5],["user:' + ALICE + '",5]],'
        '"key":"k1","kind":"deposit","meta":{"note":"é"},"prev_hash":"' + "0" * 64 + '",'
        '"seq":1,"v":1}'
    ).encode()
    assert body == expected
    assert (
        lg.compute_hash(
            1, "deposit", "k1", lg.deposit_entries(ALICE, 5), {"note": "é"}, 7, lg.GENESIS_HASH
        )
        == hashlib.sha256(b"0" * 64 + expected).hexdigest()
    )


@pytest.mark.parametrize(
    ("kind", "entries", "meta", "match"),
    [
        (lg.DEPOSIT, [(lg.FAUCET, -5)], {}, "at least 2"),
        (lg.DEPOSIT, [(lg.FAUCET, -5), (f"user:{ALICE}", 4)], {}, "sum to -1"),
        (lg.DEPOSIT, [(lg.FAUCET, 0), (f"user:{ALICE}", 0)], {}, "zero entry"),
        (lg.DEPOSIT, [(lg.FAUCET, -5), (f"user:{ALICE}", 5.0)], {}, "must be an int"),
        (lg.DEPOSIT, [(lg.FAUCET, -5), (f"user:{ALICE}", True)], {}, "must be an int"),
        (
            lg.DEPOSIT,
            [(lg.FAUCET, -(MAX_MICRO + 1)), (f"user:{ALICE}", MAX_MICRO + 1)],
            {},
            "bound",
        ),
        (lg.DEPOSIT, [(lg.FAUCET, -5), ("user:nobody", 5)], {}, "invalid account"),
        (lg.DEPOSIT, [(lg.FAUCET, -5), (lg.FAUCET, 5)], {}, "canonical order"),
        (lg.DEPOSIT, [(lg.FEES, -5), (f"user:{ALICE}", 5)], {}, "debit on system:faucet"),
        (lg.HOLD, [(f"user:{ALICE}", -5), (f"user:{BOB}", 5)], {}, "escrow"),
        (lg.REFUND, [("escrow:c", -5), (f"earnings:{ALICE}", 5)], {}, "user"),
        (lg.PAYOUT, [(f"user:{ALICE}", -5), ("payout:bank", 5)], {}, "earnings"),
        ("mint", [(lg.FAUCET, -5), (f"user:{ALICE}", 5)], {}, "unknown transaction kind"),
        (lg.SETTLE, [("escrow:c", -5), (f"earnings:{SUP1}", 5)], {}, "fee_bps"),
        (lg.SETTLE, [("escrow:c", -5), (f"earnings:{SUP1}", 5)], {"fee_bps": "1.5"}, "fee_bps"),
        (
            lg.SETTLE,
            [("escrow:c", -100), (f"earnings:{SUP1}", 80), (lg.FEES, 20)],
            {"fee_bps": "1000"},
            "does not match",
        ),
        (lg.SETTLE, [("escrow:c", -5), (f"user:{SUP1}", 5)], {"fee_bps": "0"}, "only credit"),
        (lg.SETTLE, [("escrow:c", -5), (lg.FEES, 5)], {"fee_bps": "10000"}, "earnings credit"),
        (lg.DEPOSIT, [(lg.FAUCET, -5), (f"user:{ALICE}", 5)], {"Bad Key": "x"}, "meta key"),
        (lg.DEPOSIT, [(lg.FAUCET, -5), (f"user:{ALICE}", 5)], {"n": 1}, "must be a string"),
        (lg.DEPOSIT, [(lg.FAUCET, -5), (f"user:{ALICE}", 5)], {"n": "\ud800"}, "Unicode"),
    ],
)
def test_build_transaction_refuses_rule_breaks(
    kind: str, entries: list[tuple[str, object]], meta: dict[str, object], match: str
) -> None:
    with pytest.raises(lg.LedgerError, match=match):
        lg.build_transaction(None, 1, kind, "k", entries, meta, T0)  # type: ignore[arg-type]


def test_build_transaction_refuses_bad_header_fields() -> None:
    entries = lg.deposit_entries(ALICE, 5)
    for key in ("", "has space", "x" * 201, "ünïcode"):
        with pytest.raises(lg.LedgerError, match="idempotency key"):
            lg.build_transaction(None, 1, lg.DEPOSIT, key, entries, {}, T0)
    with pytest.raises(lg.LedgerError, match="created_at"):
        lg.build_transaction(None, 1, lg.DEPOSIT, "k", entries, {}, -1)
    with pytest.raises(lg.LedgerError, match="prev_hash"):
        lg.build_transaction("nope", 2, lg.DEPOSIT, "k", entries, {}, T0)


# --------------------------------------------------------------------------- apply


def test_apply_is_atomic_and_names_account_and_shortfall() -> None:
    balances: dict[str, int] = {f"user:{ALICE}": 1_500_000}
    entries = lg.hold_entries(ALICE, "c", 2_750_000)
    with pytest.raises(lg.InsufficientFunds) as info:
        lg.apply(balances, entries)
    assert info.value.account == f"user:{ALICE}"
    assert info.value.shortfall_micro == 1_250_000
    assert "1.25 credits" in str(info.value)
    assert f"user:{ALICE}" in str(info.value)
    assert balances == {f"user:{ALICE}": 1_500_000}
    lg.apply(balances, lg.deposit_entries(ALICE, 5))  # the faucet may go negative
    assert balances[lg.FAUCET] == -5


def test_memory_ledger_idempotency() -> None:
    led = lv.MemoryLedger()
    t = led.post(lg.DEPOSIT, "dep", lg.deposit_entries(ALICE, 5), {"a": "1"}, T0)
    again = led.post(lg.DEPOSIT, "dep", lg.deposit_entries(ALICE, 5), {"a": "1"}, T0 + 99)
    assert again is t
    assert len(led.txns) == 1
    with pytest.raises(lg.IdempotencyConflict):
        led.post(lg.DEPOSIT, "dep", lg.deposit_entries(ALICE, 6), {"a": "1"}, T0)
    with pytest.raises(lg.InsufficientFunds):
        led.post(lg.HOLD, "hold", lg.hold_entries(ALICE, "c", 6), None, T0)
    assert len(led.txns) == 1
    assert led.balance(f"user:{ALICE}") == 5


# --------------------------------------------------------------------------- verify_chain


def test_verify_chain_accepts_a_good_chain() -> None:
    led = demo_chain()
    report = lv.verify_chain(iter(led.txns), expected_head=led.head_hash)
    assert report.ok, report.failure
    assert report.count == len(led.txns) == report.last_seq
    assert report.balances == led.balances
    assert report.minted_micro == 105 * MICRO
    assert report.head_hash == led.head_hash
    assert sum(report.balances.values()) == 0
    empty = lv.verify_chain([])
    assert empty.ok
    assert empty.head_hash == lg.GENESIS_HASH


def test_verify_chain_from_checkpoint() -> None:
    led = demo_chain()
    head = lv.verify_chain(led.txns[:3])
    tail = lv.verify_chain(
        led.txns[3:],
        start_seq=4,
        start_hash=head.head_hash,
        start_balances=head.balances,
    )
    assert tail.ok, tail.failure
    assert tail.balances == led.balances
    bad = lv.verify_chain(led.txns, expected_head="f" * 64)
    assert not bad.ok
    assert bad.failure is not None
    assert "expected head" in bad.failure.reason


def _first_failure(txns: Sequence[Transaction]) -> lv.VerifyFailure:
    report = lv.verify_chain(txns)
    assert not report.ok
    assert report.failure is not None
    return report.failure


def test_verify_reports_rule_breaks_even_with_valid_hashes() -> None:
    txns = demo_chain().txns
    # overdraw: the refund takes more than the hold left, resealed so every hash is right
    forged = list(txns)
    forged[4] = dataclasses.replace(forged[4], entries=lg.refund_entries("c1", ALICE, 60 * MICRO))
    failure = _first_failure(reseal(forged))
    assert (failure.index, failure.seq) == (4, 5)
    assert "escrow:c1 would go negative" in failure.reason
    assert "short by 30.000018 credits" in failure.reason

    forged = list(txns)
    forged[4] = dataclasses.replace(forged[4], entries=lg.refund_entries("c1", BOB, MICRO))
    failure = _first_failure(reseal(forged))
    assert failure.seq == 5
    assert "belongs to" in failure.reason

    forged = list(txns)
    forged[1] = dataclasses.replace(forged[1], idempotency_key="dep-a")
    failure = _first_failure(reseal(forged))
    assert failure.seq == 2
    assert "used twice" in failure.reason
    assert lv.verify_chain(reseal(forged), check_keys=False).ok

    forged = list(txns)
    forged[0] = dataclasses.replace(
        forged[0],
        entries=(Entry(lg.FAUCET, -5), Entry(f"user:{ALICE}", 5.0)),  # type: ignore[arg-type]
    )
    failure = _first_failure(reseal(forged))
    assert (failure.seq, failure.index) == (1, 0)

    forged = list(txns)
    forged[2] = dataclasses.replace(forged[2], kind=lg.DEPOSIT)
    assert "debit on system:faucet" in _first_failure(reseal(forged)).reason

    forged = list(txns)
    forged[0] = dataclasses.replace(forged[0], meta={"x": 1})  # type: ignore[dict-item]
    assert "must be a string" in _first_failure(reseal(forged)).reason

    forged = list(txns)
    forged[0] = dataclasses.replace(forged[0], created_at=1.5)  # type: ignore[arg-type]
    assert "created_at" in _first_failure(reseal(forged)).reason

    failure = _first_failure([*txns[:2], "junk"])  # type: ignore[list-item]
    assert failure.index == 2
    assert "malformed" in failure.reason


def _flip(text: str, pos: int) -> str:
    pos %= len(text)
    ch = text[pos]
    repl = "0" if ch != "0" else "1"
    return text[:pos] + repl + text[pos + 1 :]


@given(
    index=st.integers(0, 5),
    field=st.sampled_from(
        ["hash", "prev_hash", "key", "kind", "account", "amount", "created_at", "seq", "meta"]
    ),
    pos=st.integers(0, 200),
)
@settings(max_examples=200, deadline=None)
def test_any_single_field_tampering_is_detected_at_its_index(
    index: int, field: str, pos: int
) -> None:
    txns = list(demo_chain().txns)
    t = txns[index]
    if field == "hash":
        t = dataclasses.replace(t, hash=_flip(t.hash, pos))
    elif field == "prev_hash":
        t = dataclasses.replace(t, prev_hash=_flip(t.prev_hash, pos))
    elif field == "key":
        t = dataclasses.replace(t, idempotency_key=_flip(t.idempotency_key, pos))
    elif field == "kind":
        t = dataclasses.replace(t, kind=_flip(t.kind, pos))
    elif field == "account":
        i = pos % len(t.entries)
        entries = list(t.entries)
        entries[i] = Entry(_flip(entries[i].account, pos // 7), entries[i].amount_micro)
        t = dataclasses.replace(t, entries=tuple(entries))
    elif field == "amount":
        # keep the transaction balanced: shift value between its first two legs
        (a, x), (b, y), *rest = t.entries
        delta = pos + 1
        t = dataclasses.replace(t, entries=(Entry(a, x + delta), Entry(b, y - delta), *rest))
    elif field == "created_at":
        t = dataclasses.replace(t, created_at=t.created_at + pos + 1)
    elif field == "seq":
        t = dataclasses.replace(t, seq=t.seq + pos + 1)
    else:
        t = dataclasses.replace(t, meta={**t.meta, "memo": str(pos)})
    txns[index] = t
    failure = _first_failure(txns)
    # tampering with a hash is seen either at the txn itself or at the next link
    if field == "hash":
        assert failure.index in (index, index + 1)
    else:
        assert failure.index == index
        assert failure.seq == t.seq


@given(data=st.data())
@settings(max_examples=50, deadline=None)
def test_reorder_and_deletion_are_detected(data: st.DataObject) -> None:
    txns = list(demo_chain().txns)
    i = data.draw(st.integers(0, len(txns) - 1), label="i")
    deleted = txns[:i] + txns[i + 1 :]
    if i < len(txns) - 1:
        failure = _first_failure(deleted)
        assert failure.index == i
        assert f"where {i + 1} was expected" in failure.reason
    else:  # dropping the last one is only visible against a published head
        report = lv.verify_chain(deleted, expected_head=txns[-1].hash)
        assert not report.ok
    j = data.draw(st.integers(0, len(txns) - 1).filter(lambda j: j != i), label="j")
    swapped = list(txns)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert _first_failure(swapped).index == min(i, j)


# --------------------------------------------------------------------------- random histories

USERS = [c * 64 for c in "ab"]
SUPPLIERS = [c * 64 for c in "123"]
CLUSTERS = ["c1", "c2"]


@dataclasses.dataclass(frozen=True)
class Op:
    """One random ledger operation; ``pct`` sizes it against the balance it draws on."""

    kind: str
    who: int
    cluster: str
    pct: int  # percent of the debited balance; above 100 must be refused
    amount: int  # deposits only
    shares: tuple[int, ...]  # settle: percent of the escrow per supplier
    fee_bps: int
    adapter: str


ops = st.builds(
    Op,
    kind=st.sampled_from(sorted(lg.KINDS)),
    who=st.integers(0, 1),
    cluster=st.sampled_from(CLUSTERS),
    pct=st.integers(1, 130),
    amount=st.integers(1, 50 * MICRO),
    shares=st.lists(st.integers(0, 45), min_size=1, max_size=3).map(tuple),
    fee_bps=st.integers(0, 10_000),
    adapter=st.sampled_from(["bank", "usdc"]),
)


def _check_invariants(balances: dict[str, int]) -> None:
    assert sum(balances.values()) == 0
    for account, value in balances.items():
        if account != lg.FAUCET:
            assert value >= 0, account


def _entries_for(
    op: Op, led: lv.MemoryLedger, owners: dict[str, str]
) -> tuple[tuple[Entry, ...], dict[str, str]] | None:
    escrow = led.balance(f"escrow:{op.cluster}")
    if op.kind == lg.DEPOSIT:
        return lg.deposit_entries(USERS[op.who], op.amount), {}
    if op.kind == lg.HOLD:
        owner = owners.setdefault(op.cluster, USERS[op.who])
        amount = max(1, led.balance(f"user:{owner}") * op.pct // 100)
        return lg.hold_entries(owner, op.cluster, amount), {}
    if op.kind == lg.REFUND:
        if op.cluster not in owners:
            return None
        amount = max(1, escrow * op.pct // 100)
        return lg.refund_entries(op.cluster, owners[op.cluster], amount), {}
    if op.kind == lg.PAYOUT:
        amount = max(1, led.balance(f"earnings:{SUPPLIERS[op.who]}") * op.pct // 100)
        return lg.payout_entries(SUPPLIERS[op.who], op.adapter, amount), {}
    gross = {SUPPLIERS[i]: escrow * p // 100 for i, p in enumerate(op.shares)}
    if sum(gross.values()) == 0 or op.fee_bps == 10_000:
        return None
    return lg.settle_entries(op.cluster, gross, op.fee_bps), lg.settle_meta(op.fee_bps)


@given(history=st.lists(ops, min_size=20, max_size=80))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_histories_conserve_credit_and_verify(history: list[Op]) -> None:
    led = lv.MemoryLedger()
    owners: dict[str, str] = {}
    for n, op in enumerate(history):
        built = _entries_for(op, led, owners)
        if built is None:
            continue
        entries, meta = built
        before = dict(led.balances)
        debit = next((e for e in entries if e.amount_micro < 0 and e.account != lg.FAUCET), None)
        feasible = debit is None or before.get(debit.account, 0) >= -debit.amount_micro
        refused: lg.InsufficientFunds | None = None
        try:
            led.post(op.kind, f"op-{n}", entries, meta, T0 + n)
        except lg.InsufficientFunds as exc:
            refused = exc
        assert (refused is None) == feasible
        if refused is not None:
            assert led.balances == before
            assert debit is not None
            assert refused.account == debit.account
            assert refused.shortfall_micro == -debit.amount_micro - before.get(debit.account, 0)
        _check_invariants(led.balances)
    report = lv.verify_chain(led.txns, expected_head=led.head_hash)
    assert report.ok, report.failure
    assert report.balances == led.balances
    assert report.count == len(led.txns)


def test_apply_sums_repeated_accounts_before_checking() -> None:
    balances = {f"user:{ALICE}": 5}
    twice = [Entry(f"user:{ALICE}", -3), Entry(f"user:{ALICE}", -3), Entry("escrow:c", 6)]
    with pytest.raises(lg.InsufficientFunds) as info:
        lg.apply(balances, twice)
    assert info.value.shortfall_micro == 1
    assert balances == {f"user:{ALICE}": 5}
