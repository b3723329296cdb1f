"""The device catalog (DESIGN.md §8): normalized device-model slugs and their datasheet figures.

Every GPU model Loom knows has one slug (``rtx4090``, ``a100-80gb``, ``h100-sxm``...) plus the
display names that NVML or rocm-smi report for it ("NVIDIA GeForce RTX 4090",
"NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"). ``cpu`` is a pseudo-model for a node's CPU
cores. The data lives in ``loom/core/data/devices.yaml`` and is read once, lazily, through
``importlib.resources``.

Lookup (:func:`normalize_model`) ignores case, whitespace and punctuation and the vendor words
NVIDIA, GeForce, Tesla, AMD and Instinct, so "rtx 4090", "RTX-4090" and
"NVIDIA GeForce RTX 4090" are all ``rtx4090``. An unknown name raises :class:`UnknownModelError`
(a ``ValueError``) that lists the closest known slugs.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

__all__ = [
    "CPU_MODEL",
    "DeviceModel",
    "UnknownModelError",
    "all_models",
    "get_model",
    "is_known_model",
    "normalize_model",
]

CPU_MODEL = "cpu"

_SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_NOISE_WORDS = ("nvidia", "geforce", "tesla", "amd", "instinct")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


class UnknownModelError(ValueError):
    """A device-model name the catalog does not know; the message lists close matches."""

    def __init__(self, name: str, suggestions: list[str]) -> None:
        self.name = name
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"unknown device model {name!r}{hint}")


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """One device model: identity and vendor peak figures (dense, no sparsity)."""

    slug: str
    vendor: str
    kind: str  # "gpu" or "cpu" (matches models.DeviceKind values)
    name: str  # the canonical display name, as NVML / rocm-smi reports it
    aliases: tuple[str, ...]
    vram_gb: float
    int8_tops: float | None
    bf16_tflops: float | None
    mem_bw_gbs: float | None
    source: str

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"


def _squash(text: str) -> str:
    """Reduce a name to its lookup key: lower-case alphanumerics, vendor words dropped."""
    value = text.strip().lower()
    for word in _NOISE_WORDS:
        value = re.sub(rf"\b{word}\b", " ", value)
    return _NON_ALNUM.sub("", value)


def _opt_float(raw: Any, field: str, slug: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"devices.yaml: {slug}.{field} must be a number or null")
    return float(raw)


def _parse_entry(raw: Any) -> DeviceModel:
    if not isinstance(raw, dict):
        raise ValueError("devices.yaml: each model must be a mapping")
    slug = str(raw["slug"])
    if not _SLUG_RE.match(slug):
        raise ValueError(f"devices.yaml: bad slug {slug!r}")
    kind = str(raw["kind"])
    if kind not in ("gpu", "cpu"):
        raise ValueError(f"devices.yaml: {slug}.kind must be gpu or cpu")
    vram = _opt_float(raw["vram_gb"], "vram_gb", slug)
    return DeviceModel(
        slug=slug,
        vendor=str(raw["vendor"]),
        kind=kind,
        name=str(raw["name"]),
        aliases=tuple(str(a) for a in raw.get("aliases") or ()),
        vram_gb=vram or 0.0,
        int8_tops=_opt_float(raw.get("int8_tops"), "int8_tops", slug),
        bf16_tflops=_opt_float(raw.get("bf16_tflops"), "bf16_tflops", slug),
        mem_bw_gbs=_opt_float(raw.get("mem_bw_gbs"), "mem_bw_gbs", slug),
        source=str(raw["source"]),
    )


@dataclass(frozen=True, slots=True)
class _Catalog:
    models: dict[str, DeviceModel]
    lookup: dict[str, str]  # squashed name -> slug
    names: dict[str, str]  # every spelling (slug, name, alias) lower-cased -> slug


@lru_cache(maxsize=1)
def _catalog() -> _Catalog:
    text = resources.files("loom.core").joinpath("data/devices.yaml").read_text("utf-8")
    doc = yaml.safe_load(text)
    models: dict[str, DeviceModel] = {}
    lookup: dict[str, str] = {}
    names: dict[str, str] = {}
    for raw in doc["models"]:
        model = _parse_entry(raw)
        if model.slug in models:
            raise ValueError(f"devices.yaml: duplicate slug {model.slug!r}")
        models[model.slug] = model
        for spelling in (model.slug, model.name, *model.aliases):
            key = _squash(spelling)
            owner = lookup.setdefault(key, model.slug)
            if owner != model.slug:
                raise ValueError(
                    f"devices.yaml: {spelling!r} of {model.slug} collides with {owner}"
                )
            names[spelling.lower()] = model.slug
    return _Catalog(models=models, lookup=lookup, names=names)


def normalize_model(name: str) -> str:
    """Map a slug, display name or alias to the catalog slug, or raise UnknownModelError."""
    if not isinstance(name, str):
        raise UnknownModelError(str(name), [])
    cat = _catalog()
    slug = cat.lookup.get(_squash(name))
    if slug is not None and _squash(name):
        return slug
    text = name.strip().lower()
    key = _squash(name)
    prefixed = [cat.lookup[k] for k in cat.lookup if key and k.startswith(key)]
    candidates = difflib.get_close_matches(text, list(cat.names), n=6, cutoff=0.6)
    squashed = difflib.get_close_matches(key, list(cat.lookup), n=6, cutoff=0.6)
    suggestions: list[str] = []
    close = [cat.names[c] for c in candidates] + [cat.lookup[s] for s in squashed]
    for slug_ in sorted(set(prefixed)) + close:
        if slug_ not in suggestions:
            suggestions.append(slug_)
    raise UnknownModelError(name, suggestions[:4])


def is_known_model(name: str) -> bool:
    """True when :func:`normalize_model` would accept ``name``."""
    try:
        normalize_model(name)
    except UnknownModelError:
        return False
    return True


def get_model(slug: str) -> DeviceModel:
    """The catalog entry for a slug (any accepted spelling works too)."""
    return _catalog().models[normalize_model(slug)]


def all_models() -> list[DeviceModel]:
    """Every catalog entry, in catalog order (GPUs first, ``cpu`` last)."""
    return list(_catalog().models.values())
