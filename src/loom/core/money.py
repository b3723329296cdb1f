"""Money: integer micro-credits inside Loom, decimal strings at the edges.

1 credit = 1,000,000 micro-credits. Floats never touch an amount.
"""

from __future__ import annotations

import re
from decimal import Decimal

MICRO = 1_000_000
#: The largest amount any single movement may carry (1e12 credits): beyond it is absurd.
MAX_MICRO = 10**18
#: The one syntax of an amount: ASCII digits, optionally a point and more digits. No sign,
#: exponent, underscore, or non-ASCII digit ('١٢' is not 12); checked before any arithmetic.
_AMOUNT_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
#: Longest amount text looked at (a 46-byte '1e999990' must never reach Decimal).
MAX_AMOUNT_CHARS = 32


class AmountError(ValueError):
    """An amount a user typed that Loom cannot accept; the message says what to change."""


def parse_credits(text: str | int | Decimal, *, allow_zero: bool = False) -> int:
    """Parse a decimal credit amount ("12.5") into micro-credits, exactly.

    Refuses negatives, more than 6 decimal places, non-numbers and absurd sizes.
    """
    if isinstance(text, float):  # pragma: no cover - guarded by the type checker too
        raise AmountError("amounts must be given as decimal strings, not floats")
    if isinstance(text, bool):
        raise AmountError("amounts must be given as decimal strings such as 12.5")
    if isinstance(text, int) and not 0 <= text <= MAX_MICRO // MICRO:
        raise AmountError(f"amount is out of range (0 to {MAX_MICRO // MICRO} credits)")
    if isinstance(text, Decimal) and (not text.is_finite() or abs(text.adjusted()) > 20):
        raise AmountError(f"amount is out of range (at most {MAX_MICRO // MICRO} credits)")
    raw = format(text, "f") if isinstance(text, Decimal) else str(text)
    if len(raw) > MAX_AMOUNT_CHARS + 8:
        raise AmountError(f"amount is too long (at most {MAX_AMOUNT_CHARS} characters)")
    raw = raw.strip(" \t")
    if len(raw) > MAX_AMOUNT_CHARS:
        raise AmountError(f"amount is too long (at most {MAX_AMOUNT_CHARS} characters)")
    negative = raw.startswith("-")
    match = _AMOUNT_RE.fullmatch(raw[1:] if negative else raw)
    if match is None:
        raise AmountError(
            f"not a number: {raw!r}; give credits like 12.5 (ASCII digits and at most one "
            "'.', no sign, exponent or '_')"
        )
    if negative:
        raise AmountError(f"amount must be positive, got {raw}")
    whole, frac = match.group(1), match.group(2) or ""
    frac = frac.rstrip("0")
    if len(frac) > 6:
        raise AmountError(f"{raw} has more than 6 decimal places; 0.000001 is the smallest unit")
    whole = whole.lstrip("0") or "0"
    if len(whole) > len(str(MAX_MICRO // MICRO)):
        raise AmountError(f"amount {raw} is too large (at most {MAX_MICRO // MICRO} credits)")
    result = int(whole) * MICRO + int(frac.ljust(6, "0") or "0")
    if result == 0 and not allow_zero:
        raise AmountError("amount must be greater than zero")
    if result > MAX_MICRO:
        raise AmountError(f"amount {raw} is too large (at most {MAX_MICRO // MICRO} credits)")
    return result


def format_credits(micro: int) -> str:
    """Format micro-credits as a decimal string with no trailing zeros ("12.5", "0")."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")
