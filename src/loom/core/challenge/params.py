"""Challenge parameters per device class, loaded from ``loom/core/data/challenge_params.yaml``.

Symbols follow ``hardware-challenge.md`` §6: M, N, K (matrix sizes), b (tile), R (rounds),
w (scored window), d (pipeline depth: nonces outstanding), λ (required fraction of the
reference rate), k openings of which k_w fall inside the scored window.
"""

from __future__ import annotations

import datetime as dt
import math
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loom.core.challenge.generator import MAX_K

PARAMS_RESOURCE = "data/challenge_params.yaml"


class Measurement(BaseModel):
    """Where a class's reference rate was measured: one recorded run of the device check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    date: dt.date = Field(description="day of the run (UTC)")
    gpu: str = Field(min_length=1, max_length=128, description="device name as NVML gave it")
    driver: str = Field(min_length=1, max_length=64, description="NVIDIA driver version")
    rate: float = Field(gt=0.0, description="best-window INT8 ops/s of this exact code")
    source: str = Field(
        default="bench/RESULTS.md",
        pattern=r"^bench/RESULTS\.md(#[\w.-]+)?$",
        description="where the run's figures are recorded",
    )
    runs: int = Field(default=1, ge=1, description="challenges behind the rate")


class ChallengeParams(BaseModel):
    """One device class's challenge parameters (immutable; validated on construction)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_class: str = Field(min_length=1, max_length=64)
    m: int = Field(gt=0, description="rows of A and C")
    n: int = Field(gt=0, description="columns of B and C")
    k: int = Field(gt=0, le=MAX_K, description="inner dimension; ≤ 131071 keeps INT32 exact")
    tile: int = Field(ge=2, le=256, description="b: tiles are b×b blocks of C")
    rounds: int = Field(ge=2, description="R: timed rounds (round 0 only starts the clock)")
    window: int = Field(ge=1, description="w: rounds in the scored window")
    depth: int = Field(ge=1, description="d: nonces the prover may hold ahead")
    lam: float = Field(gt=0.0, le=1.0, description="λ: required fraction of reference_rate")
    openings: int = Field(ge=1, description="k: tiles opened per challenge")
    openings_in_window: int = Field(ge=0, description="k_w: openings inside the scored window")
    reference_rate: float = Field(gt=0.0, description="P_ref: INT8 ops/s of this exact code")
    core_rate: float | None = Field(
        default=None,
        gt=0.0,
        description="CPU classes: ops/s counted as one core; a CPU is offered "
        "floor(measured / core_rate) cores, never more than it claims (core.challenge.capacity)",
    )
    assumed: bool = Field(default=False, description="P_ref is an assumption, not measured")
    measured: Measurement | None = Field(default=None, description="the run behind P_ref")
    retries_per_day: int = Field(default=3, ge=0, description="m: attempts allowed per day")
    timeout_factor: float = Field(default=3.0, ge=1.0, description="× the λ-paced duration")
    timeout_grace_s: float = Field(default=30.0, ge=0.0, description="set-up allowance (s)")
    note: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ChallengeParams:
        problems: list[str] = []
        if self.m % self.tile or self.n % self.tile:
            problems.append(f"m={self.m} and n={self.n} must be multiples of tile={self.tile}")
        if self.k % 8:
            problems.append(f"k={self.k} must be a multiple of 8 (generator and int8 GEMM)")
        if self.window >= self.rounds:
            problems.append(f"window={self.window} needs at least window+1 rounds")
        if self.depth >= self.window:
            problems.append(f"depth={self.depth} must be below window={self.window}")
        if self.openings_in_window > self.openings:
            problems.append("openings_in_window cannot exceed openings")
        tiles_round = (self.m // self.tile) * (self.n // self.tile)
        if self.openings_in_window > tiles_round * self.window:
            problems.append("more in-window openings than tiles in the window")
        if self.openings > tiles_round * self.rounds:
            problems.append("more openings than tiles in the challenge")
        if self.assumed and self.measured is not None:
            problems.append("say either assumed: true or measured: {...}, not both")
        if self.measured is not None and self.reference_rate > self.measured.rate:
            problems.append(
                f"reference_rate={self.reference_rate:.4g} is above the measured rate "
                f"{self.measured.rate:.4g}: the measured GPU itself would fail"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def reference_rate_source(self) -> Literal["assumption", "measured"]:
        """``measured`` when a recorded run backs P_ref, else ``assumption``."""
        return "measured" if self.measured is not None else "assumption"

    # ---------------------------------------------------------------- derived values
    @property
    def ops_per_round(self) -> int:
        """W_r = 2·M·N·K integer operations per round."""
        return 2 * self.m * self.n * self.k

    @property
    def tile_rows(self) -> int:
        """M/b: leaves per round."""
        return self.m // self.tile

    @property
    def tile_cols(self) -> int:
        """N/b: digests per leaf."""
        return self.n // self.tile

    @property
    def tiles_per_round(self) -> int:
        return self.tile_rows * self.tile_cols

    @property
    def required_rate(self) -> float:
        """λ·P_ref: the best window must run at least this fast (ops/s)."""
        return self.lam * self.reference_rate

    @property
    def window_deadline_s(self) -> float:
        """Some w consecutive roots must arrive within this many seconds."""
        return self.window * self.ops_per_round / self.required_rate

    @property
    def expected_duration_s(self) -> float:
        """Duration of all R rounds at exactly the reference rate."""
        return self.rounds * self.ops_per_round / self.reference_rate

    @property
    def hard_timeout_s(self) -> float:
        """Give up when the last root has not arrived this long after start."""
        paced = self.rounds * self.ops_per_round / self.required_rate
        return self.timeout_grace_s + self.timeout_factor * paced

    @property
    def withholding_factor(self) -> float:
        """w/(w−d): the most a prover gains by banking d rounds and bursting them."""
        return self.window / (self.window - self.depth)

    def cheat_fraction(self, fake_rate: float) -> float:
        """f: the fraction of tiles a device of ``fake_rate`` ops/s can compute in time."""
        return min(1.0, fake_rate * self.withholding_factor / self.required_rate)

    def fake_pass_bound(self, fake_rate: float) -> float:
        """Upper bound on a device of ``fake_rate`` passing one attempt: (f + 2⁻⁶⁴)^k_w."""
        return float(
            min(1.0, (self.cheat_fraction(fake_rate) + 2.0**-64) ** self.openings_in_window)
        )

    def honest_fail_probability(self, available: float, sigma: float) -> float:
        """Φ((λ/L − 1)/σ): chance an honest device at load fraction L fails timing."""
        z = (self.lam / available - 1.0) / sigma
        return 0.5 * math.erfc(-z / math.sqrt(2.0))

    def replace(self, **changes: Any) -> ChallengeParams:
        """A validated copy with some fields changed (e.g. scaled down for a test)."""
        return ChallengeParams.model_validate({**self.model_dump(), **changes})


class UnknownDeviceClass(KeyError):
    """No parameters for this device class."""


@cache
def _table() -> dict[str, ChallengeParams]:
    text = resources.files("loom.core").joinpath(PARAMS_RESOURCE).read_text(encoding="utf-8")
    return parse_params_table(text)


def parse_params_table(text: str) -> dict[str, ChallengeParams]:
    """Parse the YAML table: ``defaults`` merged under each entry of ``classes``."""
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict):
        raise ValueError("challenge parameter file needs a 'classes' mapping")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ValueError("'defaults' must be a mapping")
    for key in ("assumed", "measured", "reference_rate_source"):
        if key in defaults:
            raise ValueError(
                f"'defaults' may not set {key!r}: each class says assumed: true or measured: "
                "{date, gpu, driver, rate, source}"
            )
    table: dict[str, ChallengeParams] = {}
    for name, entry in raw["classes"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"class {name!r} must be a mapping")
        if not entry.get("assumed") and "measured" not in entry:
            raise ValueError(
                f"class {name!r} must say where its reference_rate comes from: "
                "assumed: true, or measured: {date, gpu, driver, rate, source: bench/RESULTS.md}"
            )
        merged = {**defaults, **entry, "device_class": str(name)}
        try:
            table[str(name)] = ChallengeParams.model_validate(merged)
        except ValueError as exc:
            raise ValueError(f"challenge parameters for {name!r}: {exc}") from exc
    return table


def device_classes() -> list[str]:
    """Names of the device classes in the shipped table."""
    return sorted(_table())


def params_for(device_class: str) -> ChallengeParams:
    """The shipped parameters of ``device_class`` (e.g. ``"h100-sxm"``, ``"cpu"``)."""
    try:
        return _table()[device_class]
    except KeyError:
        known = ", ".join(sorted(_table()))
        raise UnknownDeviceClass(
            f"no challenge parameters for device class {device_class!r} (known: {known})"
        ) from None
