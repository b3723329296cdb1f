"""Parameter table, derived figures and the soundness/completeness numbers of the design."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from loom.client.cli import challenge
from loom.client.cli.main import app as root
from loom.core.challenge import ChallengeParams, UnknownDeviceClass, device_classes, params_for
from loom.core.challenge.params import parse_params_table
from loom.core.challenge.timing import best_window, format_rate

GPU_CLASSES = ["h100-sxm", "h100-pcie", "h200", "a100-80gb", "a100-40gb", "rtx4090", "l40s"]


def test_table_has_required_classes() -> None:
    assert {"cpu", "test", *GPU_CLASSES} <= set(device_classes())
    with pytest.raises(UnknownDeviceClass, match="h100-sxm"):
        params_for("gtx-fake-9000")


@pytest.mark.parametrize("name", GPU_CLASSES)
def test_gpu_classes_follow_the_design(name: str) -> None:
    p = params_for(name)
    assert (p.m, p.n, p.tile, p.rounds, p.window, p.depth) == (32768, 32768, 32, 96, 40, 5)
    assert (p.openings, p.openings_in_window, p.lam) == (64, 48, 0.7)
    assert p.reference_rate_source == "assumption"  # no GPU has been measured yet
    assert p.k % 1024 == 0
    round_s = p.ops_per_round / p.reference_rate
    assert 0.09 < round_s < 0.1  # K is scaled so a round takes ≈ 95 ms at P_ref
    assert p.window_deadline_s == pytest.approx(5.4, abs=0.15)


def test_h100_reference_numbers() -> None:
    p = params_for("h100-sxm")
    assert p.k == 65536
    assert p.ops_per_round == pytest.approx(1.41e14, rel=0.01)
    assert p.withholding_factor == pytest.approx(40 / 35)
    # §6.7 table: fakes credited with their peak INT8 rates.
    assert p.cheat_fraction(624e12) == pytest.approx(0.69, abs=0.01)  # A100
    assert p.cheat_fraction(660.6e12) == pytest.approx(0.73, abs=0.01)  # RTX 4090
    assert p.cheat_fraction(733e12) == pytest.approx(0.81, abs=0.01)  # L40S
    assert p.fake_pass_bound(733e12) < 4e-5
    assert p.fake_pass_bound(624e12) < 3e-8
    assert p.fake_pass_bound(0.16e12) < 1e-100  # a 2-vCPU VM
    assert p.cheat_fraction(1513e12) == 1.0  # H100 PCIe: not separable
    # Completeness (λ = 0.7): honest at 80 % load with σ = 3 % fails with ≈ 1.5e-5.
    assert p.honest_fail_probability(0.8, 0.03) == pytest.approx(1.5e-5, rel=0.2)
    assert p.honest_fail_probability(1.0, 0.03) < 1e-20


def test_cpu_and_test_classes_are_small() -> None:
    cpu, test = params_for("cpu"), params_for("test")
    assert cpu.ops_per_round < 1e10
    assert test.ops_per_round < 1e6
    assert test.tiles_per_round * test.window >= test.openings_in_window


def _base(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        device_class="x",
        m=64,
        n=64,
        k=64,
        tile=8,
        rounds=6,
        window=3,
        depth=1,
        lam=0.5,
        openings=8,
        openings_in_window=4,
        reference_rate=1e6,
    )
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"m": 60}, "multiples of tile"),
        ({"k": 60}, "multiple of 8"),
        ({"window": 6}, "window"),
        ({"depth": 3}, "depth"),
        ({"openings_in_window": 9}, "cannot exceed"),
        ({"k": 140000}, "less than or equal"),
        ({"lam": 1.5}, "less than or equal"),
        ({"unknown_field": 1}, "Extra inputs"),
    ],
)
def test_invalid_parameters_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChallengeParams.model_validate(_base(**changes))


def test_replace_revalidates() -> None:
    p = ChallengeParams.model_validate(_base())
    assert p.replace(rounds=10).rounds == 10
    with pytest.raises(ValueError, match="window"):
        p.replace(rounds=3)


def test_parse_table_merges_defaults_and_names_bad_class() -> None:
    text = """
defaults: {tile: 8, rounds: 6, window: 3, depth: 1, lam: 0.5, openings: 8,
           openings_in_window: 4, reference_rate: 1.0e6}
classes:
  small: {m: 64, n: 64, k: 64, assumed: true}
"""
    table = parse_params_table(text)
    assert table["small"].device_class == "small"
    assert table["small"].tile == 8
    with pytest.raises(ValueError, match="'broken'"):
        parse_params_table(text + "  broken: {m: 63, n: 64, k: 64, assumed: true}\n")
    with pytest.raises(ValueError, match="classes"):
        parse_params_table("defaults: {}\n")


def test_best_window_is_a_slope_and_latency_cancels() -> None:
    arrivals = [0.0, 1.0, 2.0, 2.5, 3.0, 3.5, 10.0]
    score = best_window(arrivals, 3, 100)
    assert score is not None
    assert (score.start, score.seconds) == (2, 1.5)
    assert list(score.rounds) == [3, 4, 5]
    assert score.rate == pytest.approx(200.0)
    shifted = best_window([t + 0.3 for t in arrivals], 3, 100)
    assert shifted is not None
    assert shifted.rate == pytest.approx(score.rate)
    assert best_window(arrivals[:3], 3, 100) is None
    burst = best_window([1.0, 1.0, 1.0], 2, 100)
    assert burst is not None
    assert math.isinf(burst.rate)


def test_format_rate() -> None:
    assert format_rate(1.484e15) == "1.48 POPS"
    assert format_rate(27.1e9) == "27.1 GOPS"
    assert format_rate(None) == "n/a"


TABLE_HEAD = """
defaults: {tile: 8, rounds: 6, window: 3, depth: 1, lam: 0.5, openings: 8,
           openings_in_window: 4}
classes:
"""


def test_every_shipped_class_says_where_its_rate_comes_from() -> None:
    for name in device_classes():
        p = params_for(name)
        assert p.assumed != (p.measured is not None), name
        assert p.reference_rate_source == ("measured" if p.measured else "assumption")


def test_a_measured_class_loads_with_its_run() -> None:
    table = parse_params_table(
        TABLE_HEAD
        + "  g: {m: 64, n: 64, k: 64, reference_rate: 1.0e6, measured: {date: 2026-12-01,\n"
        + "      gpu: NVIDIA H200, driver: 580.159.04, rate: 1.25e6, source: bench/RESULTS.md}}\n"
    )
    g = table["g"]
    assert g.reference_rate_source == "measured" and not g.assumed
    assert g.measured is not None
    assert (g.measured.gpu, g.measured.driver, g.measured.rate) == (
        "NVIDIA H200",
        "580.159.04",
        1.25e6,
    )
    assert str(g.measured.date) == "2026-12-01" and g.measured.runs == 1
    # It survives the wire (ChallengeSpec carries the params as JSON).
    assert type(g).model_validate_json(g.model_dump_json()) == g


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{m: 64, n: 64, k: 64, reference_rate: 1.0e6}", "must say where its reference_rate"),
        (
            "{m: 64, n: 64, k: 64, reference_rate: 1.0e6, assumed: true, measured: {date: "
            "2026-12-01, gpu: x, driver: y, rate: 2.0e6}}",
            "not both",
        ),
        (
            "{m: 64, n: 64, k: 64, reference_rate: 3.0e6, measured: {date: 2026-12-01, gpu: x, "
            "driver: y, rate: 2.0e6}}",
            "above the measured rate",
        ),
        (
            "{m: 64, n: 64, k: 64, reference_rate: 1.0e6, measured: {date: 2026-12-01, gpu: x, "
            "driver: y, rate: 2.0e6, source: somewhere.txt}}",
            "source",
        ),
        (
            "{m: 64, n: 64, k: 64, reference_rate: 1.0e6, measured: {date: 2026-12-01, gpu: x, "
            "rate: 2.0e6}}",
            "driver",
        ),
    ],
)
def test_bad_rate_provenance_is_refused(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_params_table(TABLE_HEAD + f"  g: {entry}\n")


def test_defaults_cannot_declare_rates_assumed_for_everyone() -> None:
    with pytest.raises(ValueError, match="may not set 'assumed'"):
        parse_params_table(
            TABLE_HEAD.replace("openings_in_window: 4", "openings_in_window: 4, assumed: true")
            + "  g: {m: 64, n: 64, k: 64, "
            "reference_rate: 1.0e6}\n"
        )


def test_loom_challenge_classes_shows_where_each_rate_comes_from() -> None:
    done = CliRunner().invoke(root, ["challenge", "classes", "--json"])
    assert done.exit_code == 0, done.output
    rows = {r["class"]: r for r in json.loads(done.output)}
    assert set(rows) == set(device_classes())
    assert rows["h200"]["reference_rate_source"] == "assumption"
    assert rows["h200"]["measured"] is None
    text = CliRunner().invoke(root, ["challenge", "classes"])
    assert text.exit_code == 0 and "assumed (never measured)" in text.output
    measured = params_for("h200").replace(
        assumed=False,
        reference_rate=1.0e15,
        measured={"date": "2026-12-01", "gpu": "NVIDIA H200", "driver": "580.1", "rate": 1.1e15},
    )
    assert challenge.source_text(measured).startswith("measured 2026-12-01 on NVIDIA H200")
    assert challenge.class_row(measured)["measured"]["driver"] == "580.1"
