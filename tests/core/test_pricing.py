from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loom.core.catalog import all_models
from loom.core.money import MICRO
from loom.core.pricing import (
    all_reference_prices,
    compare_with_clouds,
    cost_micro,
    median_price,
    quote,
    quote_lines,
    reference_prices,
)


def test_reference_table_is_well_formed() -> None:
    rows = all_reference_prices()
    slugs = {m.slug for m in all_models()}
    assert len(rows) >= 20
    for row in rows:
        assert row.model in slugs
        assert row.usd_per_gpu_hour > 0
        assert row.micro_per_hour == int(row.usd_per_gpu_hour * MICRO)
        assert re.fullmatch(r"20\d\d-\d\d", row.as_of)
        assert row.basis in ("instance", "gpu-only")
        assert row.source
    providers = {r.provider for r in rows}
    assert {"aws", "gcp", "azure", "lambda", "coreweave"} <= providers


def test_reference_prices_by_any_spelling_cheapest_first() -> None:
    rows = reference_prices("NVIDIA H100 80GB HBM3")
    assert {r.provider for r in rows} >= {"aws", "gcp", "azure"}
    prices = [r.usd_per_gpu_hour for r in rows]
    assert prices == sorted(prices)
    assert reference_prices("rtx4090") == []
    with pytest.raises(ValueError, match="unknown device model"):
        reference_prices("gtx9999")


def test_median_price() -> None:
    assert median_price([]) is None
    assert median_price([5]) == 5
    assert median_price([3, 1, 2]) == 2
    assert median_price([1, 2]) == 2  # (1 + 2) / 2 rounded up
    assert median_price([400_000, 200_000, 300_000, 100_000]) == 250_000
    with pytest.raises(ValueError, match="negative"):
        median_price([1, -1])


def test_quote_integer_math() -> None:
    q = quote(400_000, 3, 7200)
    assert (q.devices, q.hourly_micro, q.total_micro) == (3, 1_200_000, 2_400_000)
    assert q.total_credits == "2.4"
    assert q.hourly_credits == "1.2"
    assert q.comparison is None
    # One micro-credit an hour for one second rounds up to one micro-credit.
    assert quote(1, 1, 1).total_micro == 1
    assert quote(1_000_001, 1, 1800).total_micro == 500_001  # 500000.5 -> up
    with pytest.raises(ValueError, match="duration"):
        quote(1, 1, 0)
    with pytest.raises(ValueError, match="bad quote line"):
        quote(1, 0, 60)


def test_quote_lines_round_once() -> None:
    q = quote_lines([(1, 1), (1, 1), (1, 1)], 1)
    assert q.total_micro == 1  # ceil(3/3600) once, not 3 x ceil(1/3600)
    assert q.devices == 3
    q2 = quote_lines([(300_000, 1), (500_000, 2)], 3600)
    assert q2.total_micro == 1_300_000
    assert q2.average_micro_per_device_hour == 433_334


def test_comparison_with_hyperscalers() -> None:
    q = quote(2 * MICRO, 8, 3600, model="h100-sxm")
    cmp = q.comparison
    assert cmp is not None
    # AWS 12.29, GCP 11.06125, Azure 12.29 -> median 12.29, min 11.06125 (GCP)
    assert cmp.hyperscaler_median_micro == 12_290_000
    assert cmp.hyperscaler_min_micro == 11_061_250
    assert cmp.hyperscaler_min_provider == "gcp"
    assert cmp.saving_vs_hyperscaler_median_pct == Decimal("83.7")
    assert cmp.saving_vs_hyperscaler_min_pct == Decimal("81.9")
    assert cmp.cheapest_cloud_provider == "lambda"
    assert cmp.saving_vs_cheapest_cloud_pct == Decimal("33.1")
    assert q.hyperscaler_median_total_micro == 8 * 12_290_000
    dearer = compare_with_clouds("h100-sxm", 20 * MICRO)
    assert dearer is not None and dearer.saving_vs_hyperscaler_median_pct is not None
    assert dearer.saving_vs_hyperscaler_median_pct < 0
    only_neoclouds = compare_with_clouds("a6000", 500_000)
    assert only_neoclouds is not None and only_neoclouds.hyperscaler_median_micro is None
    assert quote(300_000, 1, 60, model="rtx4090").comparison is None


@given(
    price=st.integers(min_value=0, max_value=10**9),
    devices=st.integers(min_value=1, max_value=512),
    seconds=st.integers(min_value=1, max_value=30 * 86400),
)
def test_quote_never_undercharges(price: int, devices: int, seconds: int) -> None:
    q = quote(price, devices, seconds)
    exact = Decimal(price * devices * seconds) / 3600
    assert exact <= q.total_micro < exact + 1
    assert q.total_micro == cost_micro(price, devices, seconds)
