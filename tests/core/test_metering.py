"""Metering: exact carry, escrow sizing, settlement splits and exhaustion detection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.core import ledger as lg
from loom.core import ledger_verify as lv
from loom.core import metering as m
from loom.core.models import MemberState

prices = st.integers(0, 50_000_000)  # up to 50 credits per device-hour
devices = st.integers(0, 64)
bps = st.integers(0, 10_000)
micros = st.integers(0, 10**15)


def test_cost_and_escrow_rounding() -> None:
    # 1 credit/device-hour, 1 device, 1 second = 277.77... micro
    assert m.cost_micro(1_000_000, 1, 1) == 277
    assert m.escrow_needed(1_000_000, 1, 1) == 278
    assert m.escrow_needed(1_000_000, 2, 3600) == 2_000_000
    assert m.escrow_needed(0, 8, 10**9) == 0
    assert m.burn_rate(400_000, 8) == 3_200_000
    with pytest.raises(m.MeteringError, match="seconds"):
        m.cost_micro(1, 1, -1)
    with pytest.raises(m.MeteringError, match="int"):
        m.escrow_needed(1.5, 1, 1)  # type: ignore[arg-type]


@given(price=prices, n=devices, seconds=st.integers(0, 10**8))
def test_escrow_needed_is_the_ceiling(price: int, n: int, seconds: int) -> None:
    exact_num = price * n * seconds
    need = m.escrow_needed(price, n, seconds)
    assert need * 3600 >= exact_num > (need - 1) * 3600 or need == 0 == exact_num
    assert m.cost_micro(price, n, seconds) <= need
    # accruing that whole duration never emits more than was held
    _acc, emitted = m.Accrual().add(price, n, seconds)
    assert emitted <= need


@given(
    price=prices,
    n=devices,
    splits=st.lists(st.integers(0, 100_000), min_size=1, max_size=50),
)
def test_accrual_over_any_split_equals_exact_total_floor(
    price: int, n: int, splits: list[int]
) -> None:
    acc = m.Accrual()
    emitted = 0
    for seconds in splits:
        acc, whole = acc.add(price, n, seconds)
        emitted += whole
    exact_num = price * n * sum(splits)
    assert emitted == exact_num // 3600  # never more, and less by under one micro
    assert emitted * 3600 <= exact_num < (emitted + 1) * 3600
    assert acc.emitted_micro == emitted
    assert emitted * 3600 + acc.carry == exact_num


@given(periods=st.lists(st.tuples(prices, devices, st.integers(0, 10**5)), max_size=40))
def test_accrual_exact_across_price_changes(periods: list[tuple[int, int, int]]) -> None:
    acc = m.Accrual()
    total = 0
    for price, n, seconds in periods:
        acc, whole = acc.add(price, n, seconds)
        total += whole
    exact_num = sum(p * n * s for p, n, s in periods)
    assert total == exact_num // 3600
    assert 0 <= acc.carry < 3600


def test_accrual_validates() -> None:
    with pytest.raises(m.MeteringError):
        m.Accrual(carry=3600)
    with pytest.raises(m.MeteringError):
        m.Accrual(carry=-1)


@given(gross=micros, fee_bps=bps)
def test_fee_split_conserves_and_rounds_down(gross: int, fee_bps: int) -> None:
    to_supplier, fee = m.fee_split(gross, fee_bps)
    assert to_supplier + fee == gross
    assert fee * 10_000 <= gross * fee_bps < (fee + 1) * 10_000
    assert to_supplier >= 0
    assert fee >= 0


def test_fee_split_examples() -> None:
    assert m.fee_split(19, 1000) == (18, 1)
    assert m.fee_split(9, 1000) == (9, 0)
    assert m.fee_split(100, 10_000) == (0, 100)
    with pytest.raises(m.MeteringError, match="100 %"):
        m.fee_split(1, 10_001)


@given(accrued=micros, escrow=micros, fee_bps=bps)
def test_settle_caps_by_escrow_and_conserves(accrued: int, escrow: int, fee_bps: int) -> None:
    s = m.settle(accrued, escrow, fee_bps)
    assert s.settled == min(accrued, escrow)
    assert s.to_supplier + s.to_fee + s.remaining == escrow
    assert s.remaining >= 0
    assert (s.to_supplier, s.to_fee) == m.fee_split(s.settled, fee_bps)


@given(
    demands=st.dictionaries(st.text("abcdef", min_size=1, max_size=3), micros, max_size=8),
    cap=micros,
)
def test_cap_pro_rata_is_exact_and_bounded(demands: dict[str, int], cap: int) -> None:
    shares = m.cap_pro_rata(demands, cap)
    assert shares.keys() == demands.keys()
    assert sum(shares.values()) == min(cap, sum(demands.values()))
    for key, share in shares.items():
        assert 0 <= share <= demands[key]
    assert m.cap_pro_rata(dict(reversed(list(demands.items()))), cap) == shares


def test_cap_pro_rata_example() -> None:
    assert m.cap_pro_rata({"a": 10, "b": 10, "c": 10}, 20) == {"a": 7, "b": 7, "c": 6}
    assert m.cap_pro_rata({"a": 1, "b": 3}, 100) == {"a": 1, "b": 3}


@given(
    escrow=st.integers(0, 10**12),
    rate=st.integers(1, 10**9),
    unsettled=st.integers(0, 10**12),
    carry=st.integers(0, 3599),
)
def test_seconds_left_is_exact(escrow: int, rate: int, unsettled: int, carry: int) -> None:
    left = m.seconds_left(escrow, rate, unsettled_micro=unsettled, carry=carry)
    assert left is not None
    available = escrow - unsettled
    if available < 0:
        assert left == 0
        return
    acc = m.Accrual(carry=carry)
    _a, emitted = acc.add(rate, 1, left)
    assert emitted <= available
    _a, emitted_more = acc.add(rate, 1, left + 1)
    assert emitted_more > available


def test_escrow_status_thresholds() -> None:
    rate = 3_600_000  # 1,000 micro per second
    assert m.seconds_left(10_000, 0) is None
    assert m.escrow_status(10_000, 0) is m.EscrowStatus.OK
    assert m.escrow_status(1_000_000_000, rate) is m.EscrowStatus.OK
    assert m.seconds_left(100_000, rate) == 100
    assert m.escrow_status(100_000, rate) is m.EscrowStatus.LOW
    assert m.escrow_status(100_000, rate, warn_seconds=100) is m.EscrowStatus.OK
    assert m.escrow_status(999, rate) is m.EscrowStatus.EXHAUSTED
    assert m.escrow_status(100_000, rate, unsettled_micro=200_000) is m.EscrowStatus.EXHAUSTED


def test_healthy_intervals_and_overlap() -> None:
    r, lost, rel, st_ = (
        MemberState.READY,
        MemberState.LOST,
        MemberState.RELEASED,
        MemberState.STARTING,
    )
    transitions = [(0, st_), (10, r), (50, lost), (60, st_), (70, r), (70, r), (100, rel)]
    assert m.healthy_intervals(transitions, now=500) == [(10, 50), (70, 100)]
    assert m.healthy_intervals([(10, r)], now=40) == [(10, 40)]
    assert m.healthy_intervals([], now=40) == []
    intervals = [(10, 50), (70, 100)]
    assert m.overlap_seconds(intervals, 0, 1000) == 70
    assert m.overlap_seconds(intervals, 40, 80) == 20
    assert m.overlap_seconds(intervals, 50, 70) == 0
    with pytest.raises(m.MeteringError, match="out of order"):
        m.healthy_intervals([(10, r), (5, lost)], now=40)
    with pytest.raises(m.MeteringError, match="before"):
        m.healthy_intervals([(10, r)], now=5)


@given(
    price=prices,
    n=st.integers(1, 16),
    ticks=st.lists(st.integers(1, 600), min_size=1, max_size=30),
    fee_bps=bps,
    duration=st.integers(1, 20_000),
)
@settings(deadline=None, max_examples=60)
def test_metering_into_the_ledger_conserves(
    price: int, n: int, ticks: list[int], fee_bps: int, duration: int
) -> None:
    """A whole cluster life: hold, meter in periods, settle each, refund the rest."""
    user, supplier = "a" * 64, "1" * 64
    led = lv.MemoryLedger()
    hold = max(1, m.escrow_needed(price, n, duration))
    led.post(lg.DEPOSIT, "dep", lg.deposit_entries(user, hold), None, 0)
    led.post(lg.HOLD, "hold", lg.hold_entries(user, "c", hold), None, 1)
    acc, unsettled, t = m.Accrual(), 0, 2
    for i, seconds in enumerate(ticks):
        acc, whole = acc.add(price, n, seconds)
        unsettled += whole
        s = m.settle(unsettled, led.balance("escrow:c"), fee_bps)
        if s.settled and s.to_supplier:
            entries = lg.settle_entries("c", {supplier: s.settled}, fee_bps)
            assert dict(entries).get(lg.FEES, 0) == s.to_fee
            led.post(lg.SETTLE, f"settle-{i}", entries, lg.settle_meta(fee_bps), t)
            unsettled -= s.settled
        t += 1
    left = led.balance("escrow:c")
    if left:
        led.post(lg.REFUND, "refund", lg.refund_entries("c", user, left), None, t)
    assert sum(led.balances.values()) == 0
    paid = led.balance(f"earnings:{supplier}") + led.balance(lg.FEES)
    assert paid + led.balance(f"user:{user}") == hold
    assert paid <= price * n * sum(ticks) // 3600
    assert lv.verify_chain(led.txns).ok


# --------------------------------------------------------------------------- confirmed time


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=10_000, allow_nan=False), max_size=40),
    st.floats(min_value=0.5, max_value=100, allow_nan=False),
)
def test_confirmed_time_is_bounded_by_the_span_and_the_gaps(
    times: list[float], max_gap: float
) -> None:
    c = m.Confirmation()
    for at in times:
        c = c.observe(at, max_gap)
    seen = sorted(set(times))
    if not seen:
        assert c == m.Confirmation()
        return
    # Never more than the span between the first and the last confirmation...
    assert 0 <= c.confirmed_s <= max(times) - min(times) + 1e-6
    # ...and never a gap longer than max_gap; out-of-order observations add nothing.
    in_order, last = 0.0, None
    for at in times:
        if last is not None and at > last:
            in_order += at - last if at - last <= max_gap else 0.0
        if last is None or at > last:
            last = at
    assert abs(c.confirmed_s - in_order) < 1e-6


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.integers(0, 10**6))
def test_billable_seconds_never_negative_nor_more_than_confirmed(
    confirmed: float, billed: int
) -> None:
    got = m.billable_seconds(confirmed, billed)
    assert got >= 0 and billed + got <= max(billed, int(confirmed))


def test_confirmation_examples() -> None:
    c = m.Confirmation().observe(100, 30)
    assert c.confirmed_s == 0 and c.last_at == 100  # the first one only starts the count
    c = c.observe(110, 30).observe(120, 30)
    assert c.confirmed_s == 20 and c.is_current(140, 30) and not c.is_current(151, 30)
    c = c.observe(200, 30)  # 80 s unconfirmed: not counted
    assert c.confirmed_s == 20 and c.last_at == 200
    assert c.observe(150, 30) == c  # late, out of order
    assert m.billable_seconds(20.9, 0) == 20 and m.billable_seconds(20.9, 25) == 0
    with pytest.raises(m.MeteringError):
        c.observe(300, 0)
    with pytest.raises(m.MeteringError):
        m.billable_seconds(-1, 0)
