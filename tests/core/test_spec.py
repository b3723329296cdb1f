from __future__ import annotations

from pathlib import Path

import pytest

from loom.core.models import ConnectivityTier, SecurityTier
from loom.core.spec import (
    ClusterSpec,
    SpecError,
    format_duration,
    load_spec,
    merge_overrides,
    parse_duration,
    parse_spec,
    spec_from_flags,
    spec_to_yaml,
)

FIXTURE = Path(__file__).parent / "fixtures" / "cluster_demo.yaml"


def problems(text: str) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        load_spec(text)
    assert isinstance(info.value, ValueError)
    return dict(info.value.problems)


def test_fixture_loads_typed() -> None:
    spec = load_spec(FIXTURE.read_text())
    assert spec.name == "demo"
    assert spec.nodes == 3
    gpu = spec.resources.gpu
    assert gpu is not None and [(o.model, o.count) for o in gpu] == [("rtx4090", 1)]
    assert spec.resources.cpus is None
    assert spec.resources.min_vram_gb == 24
    assert spec.regions == ("eu-west", "eu-central")
    assert spec.security is SecurityTier.COMMUNITY
    assert spec.connectivity is ConnectivityTier.MEDIUM
    assert spec.min_reliability == 0.9
    assert spec.max_price == 400_000
    assert spec.duration == 7200
    assert spec.env == {"WANDB_MODE": "offline"}


def test_round_trip_through_yaml_and_dump() -> None:
    spec = load_spec(FIXTURE.read_text())
    assert load_spec(spec_to_yaml(spec)) == spec
    assert parse_spec(spec.model_dump()) == spec
    dumped = spec.model_dump(mode="json")
    assert dumped["max_price"] == "0.4"
    assert dumped["duration"] == "2h"
    assert dumped["security"] == "community"
    assert dumped["resources"]["gpu"] == ["rtx4090:1"]


def test_defaults() -> None:
    spec = load_spec("name: tiny")
    assert spec.nodes == 1
    assert spec.resources.cpus == 1 and spec.resources.gpu is None
    assert spec.duration == 3600
    assert spec.max_price is None
    assert spec.regions == ()
    assert spec.security is SecurityTier.COMMUNITY
    assert load_spec("{}").name is None


def test_gpu_forms() -> None:
    spec = load_spec('resources: {gpu: [rtx4090, "a100-80gb:2", "NVIDIA H100 PCIe:4"]}')
    assert spec.resources.gpu is not None
    assert [str(o) for o in spec.resources.gpu] == ["rtx4090:1", "a100-80gb:2", "h100-pcie:4"]
    assert load_spec("resources: {gpu: rtx3090}").devices_per_node == 1
    assert load_spec("resources: {cpus: 8}").devices_per_node == 8


def test_unknown_fields_are_refused_with_path() -> None:
    found = problems("name: x\nnodez: 2\nresources: {gpu: rtx4090, memory: 3}\n")
    assert "did you mean nodes?" in found["nodez"]
    assert found["nodez"].startswith("unknown field")
    assert "allowed: gpu, cpus, min_vram_gb, min_ram_gb" in found["resources.memory"]
    with pytest.raises(SpecError) as info:
        load_spec("nodez: 2")
    assert str(info.value).startswith("invalid cluster spec:\n  nodez: unknown field")


def test_each_problem_gets_its_own_path() -> None:
    found = problems(
        """
name: Demo_1
nodes: 65
resources: {gpu: [rtx4091, "a100-80gb:x", "rtx4090:0"]}
regions: [eu-west, europe]
security: top
connectivity: warp
min_reliability: 1.5
max_price: 0.1234567
duration: 31d
env: {RAY_ADDRESS: x}
"""
    )
    assert set(found) == {
        "name",
        "nodes",
        "resources.gpu.0",
        "resources.gpu.1",
        "resources.gpu.2.count",
        "regions.1",
        "security",
        "connectivity",
        "min_reliability",
        "max_price",
        "duration",
        "env",
    }
    assert "did you mean rtx4090" in found["resources.gpu.0"]
    assert "MODEL:COUNT" in found["resources.gpu.1"]
    assert "eu-west" in found["regions.1"]
    assert "community, datacenter, confidential" in found["security"]
    assert "6 decimal places" in found["max_price"]
    assert "30d" in found["duration"]
    assert "reserved" in found["env"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("resources: {gpu: rtx4090, cpus: 2}", "either gpu or cpus"),
        ("resources: {gpu: []}", "at least one GPU model"),
        ("resources: {gpu: cpu}", "use resources.cpus"),
        ("resources: {gpu: 4090:2}", "quote the GPU model"),
        ("resources: {gpu: [rtx4090, RTX 4090]}", "listed twice"),
        ("resources: {cpus: 2, min_vram_gb: 8}", "only applies to GPU nodes"),
        ("max_price: abc", "not a number"),
        ("max_price: true", "number of credits"),
        ("max_price: 0", "greater than zero"),
        ("duration: 5", "needs a unit"),
        ("duration: 5x", "invalid duration"),
        ("env: {1BAD: x}", "invalid variable name"),
        ("env: {loom_token: x}", "reserved"),
        ("env: {DEBUG: true}", "quote it"),
        ("regions: [3]", "region must be text"),
        ("nodes: 0", "greater than or equal to 1"),
    ],
)
def test_bad_values(text: str, message: str) -> None:
    found = problems(text)
    assert any(message in msg for msg in found.values()), found


def test_yaml_syntax_errors_carry_line_numbers() -> None:
    found = problems("name: demo\nnodes: [1,\nresources: {")
    ((where, msg),) = found.items()
    assert where.startswith("line ")
    assert "YAML syntax error" in msg
    assert problems("name: a\nname: b") == {
        "line 2, column 1": "YAML syntax error: duplicate key 'name'"
    }
    assert "mapping" in problems("- 1\n- 2")[""]
    assert "empty" in problems("")[""]


def test_prices_and_durations() -> None:
    assert load_spec("max_price: 0.40").max_price == 400_000
    assert load_spec("max_price: '1.5'").max_price == 1_500_000
    assert load_spec("max_price: 2").max_price == 2_000_000
    assert load_spec("max_price: 0.000001").max_price == 1
    assert load_spec("regions: EU-West").regions == ("eu-west",)
    assert load_spec("regions: [eu-west, eu-west]").regions == ("eu-west",)
    assert load_spec("env: {PORT: 8080}").env == {"PORT": "8080"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2h", 7200), ("30m", 1800), ("90s", 90), ("1h30m", 5400), ("1d", 86400), ("30d", 2592000)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("bad", ["", "0s", "h", "1.5h", "2h1d", "31d", "-1h"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_flags_override_file() -> None:
    base = {
        "name": "demo",
        "nodes": 2,
        "resources": {"cpus": 4, "min_ram_gb": 8},
        "env": {"A": "1"},
        "max_price": "0.3",
    }
    spec = spec_from_flags(
        base,
        nodes=5,
        gpu="rtx4090:2,a100-80gb",
        regions="eu-west, us-east",
        max_price="0.5",
        env={"B": "2"},
        security="datacenter",
        duration="45m",
    )
    assert spec.name == "demo"
    assert spec.nodes == 5
    assert spec.resources.cpus is None  # gpu from the flags replaces the file's cpus
    assert spec.resources.min_ram_gb == 8
    assert spec.resources.gpu is not None and len(spec.resources.gpu) == 2
    assert spec.regions == ("eu-west", "us-east")
    assert spec.max_price == 500_000
    assert spec.env == {"A": "1", "B": "2"}
    assert spec.security is SecurityTier.DATACENTER
    assert spec.duration == 2700
    assert base["resources"] == {"cpus": 4, "min_ram_gb": 8}  # the input is not mutated


def test_merge_overrides_paths() -> None:
    merged = merge_overrides(
        {"resources": {"gpu": "rtx4090", "min_vram_gb": 24}},
        {"cpus": 2, "nodes": None, "resources.min_ram_gb": 16},
    )
    assert merged == {"resources": {"cpus": 2, "min_ram_gb": 16}}
    assert merge_overrides({}, {"a.b": 1}) == {"a": {"b": 1}}
    with pytest.raises(SpecError, match="max_price: not a number"):
        spec_from_flags(max_price="cheap")


def test_spec_is_immutable() -> None:
    spec = ClusterSpec()
    with pytest.raises(ValueError):
        spec.nodes = 3  # type: ignore[misc]
