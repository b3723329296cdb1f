"""Prices: quotes in integer micro-credits and a reference table of cloud list prices.

Everything inside Loom is an integer number of micro-credits (``money.MICRO`` per credit);
prices are *per device-hour* (for the ``cpu`` pseudo-model: per core-hour). A quote
multiplies price x devices x seconds / 3600 and rounds the total *up* to the next
micro-credit once, never per line, so a quote is never short of what metering will charge.

To compare with hyperscalers, **1 credit is treated as 1 US dollar**. The reference table
(``loom/core/data/cloud_prices.csv``) holds public on-demand list prices per GPU-hour,
each with its provider, instance, basis (``instance``: the GPU's share of a whole instance
incl. CPU and RAM; ``gpu-only``: the GPU component alone), region, the month the price is
believed to date from (``as_of``) and the page it came from. List prices move; treat the
table as an order of magnitude, not a live feed. Hyperscalers are AWS, GCP and Azure.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from importlib import resources

from loom.core.catalog import normalize_model
from loom.core.money import MICRO, format_credits

__all__ = [
    "HYPERSCALERS",
    "SECONDS_PER_HOUR",
    "CloudComparison",
    "Quote",
    "ReferencePrice",
    "all_reference_prices",
    "compare_with_clouds",
    "cost_micro",
    "median_price",
    "quote",
    "quote_lines",
    "reference_prices",
]

SECONDS_PER_HOUR = 3600
HYPERSCALERS = frozenset({"aws", "gcp", "azure"})


@dataclass(frozen=True, slots=True)
class ReferencePrice:
    """One row of the reference table. ``micro_per_hour`` is the USD price as micro-credits."""

    model: str
    provider: str
    usd_per_gpu_hour: Decimal
    instance: str
    basis: str  # "instance" or "gpu-only"
    region: str
    as_of: str  # YYYY-MM the list price is believed to date from
    source: str

    @property
    def micro_per_hour(self) -> int:
        return _usd_to_micro(self.usd_per_gpu_hour)

    @property
    def hyperscaler(self) -> bool:
        return self.provider in HYPERSCALERS


def _usd_to_micro(usd: Decimal) -> int:
    """1 credit = 1 USD; sub-micro fractions round half up (list prices have <= 6 places)."""
    return int((usd * MICRO).to_integral_value(rounding=ROUND_HALF_UP))


@lru_cache(maxsize=1)
def _table() -> tuple[ReferencePrice, ...]:
    text = resources.files("loom.core").joinpath("data/cloud_prices.csv").read_text("utf-8")
    rows: list[ReferencePrice] = []
    for raw in csv.DictReader(io.StringIO(text)):
        usd = Decimal(raw["usd_per_gpu_hour"])
        if usd <= 0:
            raise ValueError(f"cloud_prices.csv: non-positive price for {raw['model']}")
        rows.append(
            ReferencePrice(
                model=normalize_model(raw["model"]),
                provider=raw["provider"].strip().lower(),
                usd_per_gpu_hour=usd,
                instance=raw["instance"],
                basis=raw["basis"],
                region=raw["region"],
                as_of=raw["as_of"],
                source=raw["source"],
            )
        )
    return tuple(rows)


def all_reference_prices() -> list[ReferencePrice]:
    """The whole reference table, in file order."""
    return list(_table())


def reference_prices(model: str) -> list[ReferencePrice]:
    """Reference list prices for one device model (any spelling), cheapest first."""
    slug = normalize_model(model)
    rows = [r for r in _table() if r.model == slug]
    return sorted(rows, key=lambda r: (r.usd_per_gpu_hour, r.provider))


def median_price(prices: Iterable[int]) -> int | None:
    """Median of micro-credit prices (``--price auto``); ``None`` when there are none.

    With an even count the two middle prices are averaged and rounded *up* to the micro.
    """
    ordered = sorted(prices)
    if not ordered:
        return None
    if any(p < 0 for p in ordered):
        raise ValueError("prices must not be negative")
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return -(-(ordered[mid - 1] + ordered[mid]) // 2)


def cost_micro(price_micro_per_hour: int, units: int, duration_s: int) -> int:
    """price per unit-hour x units x seconds, rounded up to the micro-credit."""
    return _ceil_div(price_micro_per_hour * units * duration_s, SECONDS_PER_HOUR)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pct_saving(ours: int, theirs: int) -> Decimal:
    """How much cheaper ``ours`` is than ``theirs``, in percent (1 decimal; negative: dearer)."""
    pct = (Decimal(theirs - ours) * 100) / Decimal(theirs)
    return pct.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


@dataclass(frozen=True, slots=True)
class CloudComparison:
    """A Loom price against reference cloud prices for the same device model (1 credit = 1 USD).

    ``*_micro`` figures are per device-hour; ``saving_*_pct`` say how much cheaper the Loom
    price is (negative when Loom is dearer).
    """

    model: str
    hyperscaler_median_micro: int | None
    hyperscaler_min_micro: int | None
    hyperscaler_min_provider: str | None
    cheapest_cloud_micro: int
    cheapest_cloud_provider: str
    saving_vs_hyperscaler_median_pct: Decimal | None
    saving_vs_hyperscaler_min_pct: Decimal | None
    saving_vs_cheapest_cloud_pct: Decimal
    references: tuple[ReferencePrice, ...]


def compare_with_clouds(model: str, loom_micro_per_hour: int) -> CloudComparison | None:
    """Compare a Loom per-device-hour price with the reference table; None if no reference."""
    rows = reference_prices(model)
    if not rows:
        return None
    hyper = [r for r in rows if r.hyperscaler]
    h_median = median_price(r.micro_per_hour for r in hyper)
    h_min = hyper[0] if hyper else None
    cheapest = rows[0]
    return CloudComparison(
        model=rows[0].model,
        hyperscaler_median_micro=h_median,
        hyperscaler_min_micro=h_min.micro_per_hour if h_min else None,
        hyperscaler_min_provider=h_min.provider if h_min else None,
        cheapest_cloud_micro=cheapest.micro_per_hour,
        cheapest_cloud_provider=cheapest.provider,
        saving_vs_hyperscaler_median_pct=(
            _pct_saving(loom_micro_per_hour, h_median) if h_median else None
        ),
        saving_vs_hyperscaler_min_pct=(
            _pct_saving(loom_micro_per_hour, h_min.micro_per_hour) if h_min else None
        ),
        saving_vs_cheapest_cloud_pct=_pct_saving(loom_micro_per_hour, cheapest.micro_per_hour),
        references=tuple(rows),
    )


@dataclass(frozen=True, slots=True)
class Quote:
    """What a cluster costs. Amounts are micro-credits; ``total_micro`` is what escrow holds."""

    devices: int
    duration_s: int
    hourly_micro: int  # sum over devices of the per-device-hour price
    total_micro: int  # hourly x duration, rounded up once to the micro-credit
    average_micro_per_device_hour: int  # rounded up
    comparison: CloudComparison | None  # None without a model or without reference prices
    hyperscaler_median_total_micro: int | None  # the same devices x duration at the median

    @property
    def total_credits(self) -> str:
        return format_credits(self.total_micro)

    @property
    def hourly_credits(self) -> str:
        return format_credits(self.hourly_micro)


def quote_lines(
    lines: Sequence[tuple[int, int]], duration_s: int, *, model: str | None = None
) -> Quote:
    """Quote a heterogeneous set: ``lines`` are ``(price_micro_per_device_hour, devices)``.

    Used for placement plans whose members have different prices. The comparison (when
    ``model`` is given) is made on the device-weighted average price.
    """
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    if not lines:
        raise ValueError("a quote needs at least one line")
    hourly = 0
    devices = 0
    for price, count in lines:
        if price < 0 or count <= 0:
            raise ValueError(f"bad quote line: price {price}, devices {count}")
        hourly += price * count
        devices += count
    total = _ceil_div(hourly * duration_s, SECONDS_PER_HOUR)
    average = _ceil_div(hourly, devices)
    comparison = compare_with_clouds(model, average) if model is not None else None
    median_total = None
    if comparison is not None and comparison.hyperscaler_median_micro is not None:
        median_total = cost_micro(comparison.hyperscaler_median_micro, devices, duration_s)
    return Quote(
        devices=devices,
        duration_s=duration_s,
        hourly_micro=hourly,
        total_micro=total,
        average_micro_per_device_hour=average,
        comparison=comparison,
        hyperscaler_median_total_micro=median_total,
    )


def quote(
    price_micro_per_device_hour: int,
    devices: int,
    duration_s: int,
    *,
    model: str | None = None,
) -> Quote:
    """Quote ``devices`` devices at one per-device-hour price for ``duration_s`` seconds."""
    return quote_lines([(price_micro_per_device_hour, devices)], duration_s, model=model)
