"""Money: integer micro-credits inside Loom, decimal strings at the edges.

1 credit = 1,000,000 micro-credits. Floats never touch an amount.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICRO = 1_000_000
#: The largest amount any single movement may carry (1e12 credits): beyond it is absurd.
MAX_MICRO = 10**18


class AmountError(ValueError):
    """An amount a user typed that Loom cannot accept; the message says what to change."""


def parse_credits(text: str | int | Decimal, *, allow_zero: bool = False) -> int:
    """Parse a decimal credit amount ("12.5") into micro-credits, exactly.

    Refuses negatives, more than 6 decimal places, non-numbers and absurd sizes.
    """
    if isinstance(text, float):  # pragma: no cover - guarded by the type checker too
        raise AmountError("amounts must be given as decimal strings, not floats")
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise AmountError(f"not a number: {text!r}; give credits like 12.5") from None
    if not value.is_finite():
        raise AmountError(f"not a finite amount: {text!r}")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise AmountError(f"{text} has more than 6 decimal places; 0.000001 is the smallest unit")
    result = int(micro)
    if result < 0:
        raise AmountError(f"amount must be positive, got {text}")
    if result == 0 and not allow_zero:
        raise AmountError("amount must be greater than zero")
    if result > MAX_MICRO:
        raise AmountError(f"amount {text} is too large (at most {MAX_MICRO // MICRO} credits)")
    return result


def format_credits(micro: int) -> str:
    """Format micro-credits as a decimal string with no trailing zeros ("12.5", "0")."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")
