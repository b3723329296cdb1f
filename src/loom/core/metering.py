"""Per-second metering and settlement arithmetic (DESIGN.md §2, money plane).

All amounts are integer micro-credits; all times are integer seconds. Prices are quoted
per device-hour, so the exact cost of ``seconds`` of ``devices`` at ``price`` is the
rational number ``price * devices * seconds / 3600`` micro-credits.

Exact carry
-----------
Metering never rounds a period on its own. An :class:`Accrual` keeps the fractional part
of a micro-credit as ``carry``, an integer in ``[0, 3600)`` measured in units of
1/3600 micro-credit (i.e. micro-credit·seconds per hour). Each call to
:meth:`Accrual.add` adds ``price * devices * seconds`` to the carry and emits only the
whole micro-credits (``divmod(total, 3600)``). Hence, however the healthy time is split
into periods — and even when the price changes between periods — the sum of what was
emitted equals ``floor(exact total)``: never more than the exact cost and never more
than one micro-credit less. The coordinator persists ``carry`` (and, for display,
``emitted_micro``) per cluster member.

Confirmed time
--------------
A member is billed only for time that a party other than its own agent confirmed (the
head's GCS as seen by another member's agent, or the coordinator's probe of the head).
:class:`Confirmation` folds those observations into ``confirmed_s``: the gap between two
consecutive confirmations counts only when it is at most ``max_gap`` seconds, so a member
nobody vouched for in a while accrues nothing for that while. The time before the first
confirmation and after the last one is never counted. Billing then accrues the whole
confirmed seconds not billed yet (:func:`billable_seconds`).

Fees
----
The platform fee is taken in basis points and rounds **down** (:func:`fee_split`): the
supplier keeps the fraction of a micro-credit. ``to_supplier + to_fee == gross`` always,
so no micro-credit is created or lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from loom.core.models import MemberState

SECONDS_PER_HOUR = 3600
BPS_DENOMINATOR = 10_000
#: An escrow that can pay for fewer seconds than this is "low": warn the owner.
DEFAULT_WARN_SECONDS = 15 * 60


class MeteringError(ValueError):
    """Arguments that metering cannot accept (negative time, price or devices...)."""


def _non_negative(name: str, value: int) -> None:
    if type(value) is not int:
        raise MeteringError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise MeteringError(f"{name} must not be negative, got {value}")


def _check_bps(fee_bps: int) -> None:
    _non_negative("fee_bps", fee_bps)
    if fee_bps > BPS_DENOMINATOR:
        raise MeteringError(f"fee_bps must be at most {BPS_DENOMINATOR} (100 %), got {fee_bps}")


# --------------------------------------------------------------------------- cost


def cost_micro(price_micro_per_device_hour: int, devices: int, seconds: int) -> int:
    """The exact cost rounded down: ``floor(price * devices * seconds / 3600)``."""
    _non_negative("price_micro_per_device_hour", price_micro_per_device_hour)
    _non_negative("devices", devices)
    _non_negative("seconds", seconds)
    return price_micro_per_device_hour * devices * seconds // SECONDS_PER_HOUR


def escrow_needed(price_micro_per_device_hour: int, devices: int, duration_s: int) -> int:
    """Micro-credits to hold for ``duration_s`` seconds, rounded **up** (ceil)."""
    _non_negative("price_micro_per_device_hour", price_micro_per_device_hour)
    _non_negative("devices", devices)
    _non_negative("duration_s", duration_s)
    return -(-price_micro_per_device_hour * devices * duration_s // SECONDS_PER_HOUR)


def burn_rate(price_micro_per_device_hour: int, devices: int) -> int:
    """Burn rate in micro-credits per hour (price × devices)."""
    _non_negative("price_micro_per_device_hour", price_micro_per_device_hour)
    _non_negative("devices", devices)
    return price_micro_per_device_hour * devices


@dataclass(frozen=True, slots=True)
class Accrual:
    """Running, exact accrual of one member: ``carry`` is in 1/3600 micro-credit units.

    Persist both fields; start a member at ``Accrual()``.
    """

    carry: int = 0
    emitted_micro: int = 0

    def __post_init__(self) -> None:
        _non_negative("emitted_micro", self.emitted_micro)
        _non_negative("carry", self.carry)
        if self.carry >= SECONDS_PER_HOUR:
            raise MeteringError(f"carry must be below {SECONDS_PER_HOUR}, got {self.carry}")

    def add(
        self, price_micro_per_device_hour: int, devices: int, seconds: int
    ) -> tuple[Accrual, int]:
        """Accrue ``seconds`` of healthy time; return the new accrual and whole micros emitted."""
        _non_negative("price_micro_per_device_hour", price_micro_per_device_hour)
        _non_negative("devices", devices)
        _non_negative("seconds", seconds)
        total = self.carry + price_micro_per_device_hour * devices * seconds
        whole, carry = divmod(total, SECONDS_PER_HOUR)
        return Accrual(carry=carry, emitted_micro=self.emitted_micro + whole), whole


# --------------------------------------------------------------------------- confirmed time


@dataclass(frozen=True, slots=True)
class Confirmation:
    """Confirmed seconds of one member so far, and when it was last confirmed."""

    confirmed_s: float = 0.0
    last_at: float | None = None

    def __post_init__(self) -> None:
        if self.confirmed_s < 0:
            raise MeteringError(f"confirmed_s must not be negative, got {self.confirmed_s}")

    def observe(self, at: float, max_gap: float) -> Confirmation:
        """Fold in one confirmation at ``at``; an out-of-order or repeated one changes nothing.

        The time since the previous confirmation counts if it is at most ``max_gap``.
        """
        if max_gap <= 0:
            raise MeteringError(f"max_gap must be positive, got {max_gap}")
        if at < 0:
            raise MeteringError(f"confirmation time must not be negative, got {at}")
        if self.last_at is None:
            return Confirmation(self.confirmed_s, at)
        gap = at - self.last_at
        if gap <= 0:
            return self
        counted = gap if gap <= max_gap else 0.0
        return Confirmation(self.confirmed_s + counted, at)

    def is_current(self, now: float, max_gap: float) -> bool:
        """Whether the member counts as confirmed at ``now`` (seen within ``max_gap``)."""
        return self.last_at is not None and now - self.last_at <= max_gap


def billable_seconds(confirmed_s: float, billed_s: int) -> int:
    """Whole confirmed seconds not billed yet (never negative)."""
    _non_negative("billed_s", billed_s)
    if confirmed_s < 0:
        raise MeteringError(f"confirmed_s must not be negative, got {confirmed_s}")
    return max(0, int(confirmed_s) - billed_s)


# --------------------------------------------------------------------------- healthy time


def healthy_intervals(
    transitions: Iterable[tuple[int, MemberState]], now: int
) -> list[tuple[int, int]]:
    """Intervals ``[start, end)`` during which a member was ``ready``.

    ``transitions`` are ``(at_s, new_state)`` in time order. Healthy time starts at a
    transition into READY and ends at the next transition out of it (LOST, RELEASED or
    anything else); a member still READY at ``now`` is healthy until ``now``.
    """
    out: list[tuple[int, int]] = []
    since: int | None = None
    last = -1
    for at, state in transitions:
        _non_negative("transition time", at)
        if at < last:
            raise MeteringError(f"transitions out of order: {at} after {last}")
        last = at
        if state == MemberState.READY:
            if since is None:
                since = at
        elif since is not None:
            if at > since:
                out.append((since, at))
            since = None
    if since is not None:
        if now < since:
            raise MeteringError(f"now ({now}) is before the last ready transition ({since})")
        if now > since:
            out.append((since, now))
    return out


def overlap_seconds(intervals: Iterable[tuple[int, int]], start: int, end: int) -> int:
    """Seconds of ``intervals`` (half-open, non-overlapping) that fall in ``[start, end)``."""
    if end < start:
        raise MeteringError(f"window end {end} is before its start {start}")
    total = 0
    for a, b in intervals:
        if b < a:
            raise MeteringError(f"interval end {b} is before its start {a}")
        lo, hi = max(a, start), min(b, end)
        if hi > lo:
            total += hi - lo
    return total


# --------------------------------------------------------------------------- settlement


def fee_split(gross_micro: int, fee_bps: int) -> tuple[int, int]:
    """Split ``gross`` into ``(to_supplier, to_fee)``; the fee rounds down."""
    _non_negative("gross_micro", gross_micro)
    _check_bps(fee_bps)
    fee = gross_micro * fee_bps // BPS_DENOMINATOR
    return gross_micro - fee, fee


class Settlement(NamedTuple):
    """What one settlement moves: escrow pays ``to_supplier + to_fee``; ``remaining`` is left."""

    to_supplier: int
    to_fee: int
    remaining: int

    @property
    def settled(self) -> int:
        """Micro-credits taken out of escrow (``to_supplier + to_fee``)."""
        return self.to_supplier + self.to_fee


def settle(accrued_unsettled: int, escrow_balance: int, fee_bps: int) -> Settlement:
    """Settle what has accrued, capped by what the escrow holds.

    ``remaining`` is the escrow balance after the settlement. If the escrow cannot cover
    the accrual, ``accrued_unsettled - settled`` is uncovered: the caller should tear the
    cluster down (and, to avoid that, watch :func:`seconds_left`).
    """
    _non_negative("accrued_unsettled", accrued_unsettled)
    _non_negative("escrow_balance", escrow_balance)
    gross = min(accrued_unsettled, escrow_balance)
    to_supplier, to_fee = fee_split(gross, fee_bps)
    return Settlement(to_supplier, to_fee, escrow_balance - gross)


def cap_pro_rata(demands: Mapping[str, int], cap: int) -> dict[str, int]:
    """Share ``cap`` among ``demands`` in proportion, exactly (largest remainder).

    If the demands fit under the cap they are returned unchanged. Otherwise every share is
    at most its demand, the shares sum to exactly ``cap``, and leftover micro-credits go to
    the largest fractional remainders (ties broken by key), so the result is deterministic.
    """
    _non_negative("cap", cap)
    for key, value in demands.items():
        _non_negative(f"demand for {key!r}", value)
    total = sum(demands.values())
    if total <= cap:
        return dict(demands)
    shares: dict[str, int] = {}
    remainders: list[tuple[int, str]] = []
    for key, value in demands.items():
        share, rem = divmod(value * cap, total)
        shares[key] = share
        remainders.append((rem, key))
    leftover = cap - sum(shares.values())
    remainders.sort(key=lambda item: (-item[0], item[1]))
    for _rem, key in remainders[:leftover]:
        shares[key] += 1
    return shares


# --------------------------------------------------------------------------- exhaustion


class EscrowStatus(StrEnum):
    OK = "ok"
    LOW = "low"
    EXHAUSTED = "exhausted"


def seconds_left(
    escrow_balance: int, burn_rate_micro_per_hour: int, *, unsettled_micro: int = 0, carry: int = 0
) -> int | None:
    """Whole seconds of healthy time the escrow can still pay for; ``None`` if nothing burns.

    ``unsettled_micro`` is what has accrued but not yet been settled out of the escrow,
    and ``carry`` the accrual's fractional part (see :class:`Accrual`). The answer is the
    largest ``s`` such that accruing ``s`` more seconds emits no more than what is left.
    """
    _non_negative("escrow_balance", escrow_balance)
    _non_negative("burn_rate_micro_per_hour", burn_rate_micro_per_hour)
    _non_negative("unsettled_micro", unsettled_micro)
    _non_negative("carry", carry)
    if carry >= SECONDS_PER_HOUR:
        raise MeteringError(f"carry must be below {SECONDS_PER_HOUR}, got {carry}")
    available = escrow_balance - unsettled_micro
    if available < 0:
        return 0
    if burn_rate_micro_per_hour == 0:
        return None
    # carry + rate*s < (available + 1) * 3600  <=>  floor((carry + rate*s)/3600) <= available
    return ((available + 1) * SECONDS_PER_HOUR - carry - 1) // burn_rate_micro_per_hour


def escrow_status(
    escrow_balance: int,
    burn_rate_micro_per_hour: int,
    *,
    unsettled_micro: int = 0,
    carry: int = 0,
    warn_seconds: int = DEFAULT_WARN_SECONDS,
) -> EscrowStatus:
    """OK, LOW (fewer than ``warn_seconds`` left) or EXHAUSTED (not one more second)."""
    _non_negative("warn_seconds", warn_seconds)
    left = seconds_left(
        escrow_balance, burn_rate_micro_per_hour, unsettled_micro=unsettled_micro, carry=carry
    )
    if left is None:
        return EscrowStatus.OK
    if left <= 0:
        return EscrowStatus.EXHAUSTED
    if left < warn_seconds:
        return EscrowStatus.LOW
    return EscrowStatus.OK
