from __future__ import annotations

import re

import pytest

from loom.core.catalog import (
    CPU_MODEL,
    UnknownModelError,
    all_models,
    get_model,
    is_known_model,
    normalize_model,
)


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 3090", "rtx3090"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA RTX A6000", "a6000"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("AMD Instinct MI300X", "mi300x"),
        ("rtx4090", "rtx4090"),
        ("RTX 4090", "rtx4090"),
        ("  rtx-4090 ", "rtx4090"),
        ("H100-SXM", "h100-sxm"),
        ("cpu", CPU_MODEL),
    ],
)
def test_normalize_display_names_and_slugs(name: str, slug: str) -> None:
    assert normalize_model(name) == slug


def test_every_spelling_maps_to_its_own_model() -> None:
    for model in all_models():
        assert normalize_model(model.slug) == model.slug
        assert normalize_model(model.name) == model.slug
        for alias in model.aliases:
            assert normalize_model(alias) == model.slug, alias


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="rtx4090") as info:
        normalize_model("rtx4091")
    assert isinstance(info.value, UnknownModelError)
    assert "unknown device model 'rtx4091'" in str(info.value)
    with pytest.raises(UnknownModelError) as ambiguous:
        normalize_model("h100")  # ambiguous on purpose: SXM, PCIe or NVL
    assert {"h100-sxm", "h100-pcie"} <= set(ambiguous.value.suggestions)
    assert not is_known_model("a100")
    assert is_known_model("NVIDIA L4")


@pytest.mark.parametrize("bad", ["", "   ", "quadro", "-", "rtx"])
def test_garbage_is_refused(bad: str) -> None:
    with pytest.raises(UnknownModelError):
        normalize_model(bad)


def test_catalog_entries_are_complete() -> None:
    models = all_models()
    slugs = [m.slug for m in models]
    assert len(slugs) == len(set(slugs)) >= 20
    required = {"rtx4090", "rtx3090", "rtx4080", "a100-40gb", "a100-80gb", "h100-sxm"}
    required |= {"h100-pcie", "h200", "l40s", "l4", "a10", "a6000", "v100", "t4", "mi300x"}
    assert required <= set(slugs)
    for m in models:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", m.slug)
        assert m.source
        if m.is_gpu:
            assert m.vendor in ("nvidia", "amd")
            assert m.vram_gb > 0
            assert m.int8_tops is not None and m.int8_tops > 0
            assert m.mem_bw_gbs is not None and m.mem_bw_gbs > 0
    cpu = get_model("cpu")
    assert cpu.kind == "cpu" and not cpu.is_gpu


def test_datasheet_figures() -> None:
    h100 = get_model("NVIDIA H100 80GB HBM3")
    assert (h100.vram_gb, h100.int8_tops, h100.bf16_tflops, h100.mem_bw_gbs) == (
        80,
        1979,
        989,
        3350,
    )
    assert get_model("rtx4090").vram_gb == 24
    assert get_model("t4").bf16_tflops is None  # Turing has no BF16 tensor path
    assert get_model("h200").vram_gb == 141
