"""Reliability score of a supplier node, in [0, 1] (DESIGN.md §5).

The formula
-----------
Four pieces of evidence each become a *component* in (0, 1), computed as the mean of a
Beta posterior whose prior has mean 0.5, so a node with no history scores exactly 0.5 on
every component and gains (or loses) with evidence:

* **uptime** ``u = (online_s + K_u/2) / (observed_s + K_u)`` with ``K_u`` =
  :data:`UPTIME_PRIOR_S` (one day of pseudo-observation). ``observed_s`` is the part of
  the scoring window (e.g. the last 30 days) the node has existed; ``online_s`` the part
  of it the node was online.
* **heartbeats** ``h = (n·r + K_h/2) / (n + K_h)`` where ``r = interval / max(interval,
  p95 gap)`` is the regularity of the heartbeat gaps (1 when the 95th-percentile gap is
  within the nominal interval, smaller as gaps stretch), ``n`` the number of gaps
  observed, ``K_h`` = :data:`HEARTBEAT_PRIOR_N`.
* **challenges** ``c = (K_c/2 + P) / (K_c + P + F_w·F)`` where ``P`` and ``F`` are the
  recency-weighted counts of passed and failed hardware challenges (weight
  ``2^(-age / half-life)``), and a failure counts :data:`FAIL_WEIGHT` times a pass.
* **clusters** ``m = (K_m/2 + completed) / (K_m + completed + L_w·lost)``: members
  released normally versus members lost (the node dropped out of a running cluster).

The score is the weighted geometric mean ``u^w_u · h^w_h · c^w_c · m^w_m`` with weights
summing to 1 (:data:`WEIGHTS`). A geometric mean keeps the score at 0.5 for a new node,
lets a single very bad component (a run of failed challenges) pull the whole score down
where an arithmetic mean would hide it, and is monotonic in every component, so:

* more uptime (or more observed time spent online) never lowers the score;
* a failed challenge never raises it, a passed one never lowers it;
* a lost member never raises it, a completed one never lowers it;
* longer heartbeat gaps never raise it.

Scores are floats (they rank nodes; they never touch money).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: Pseudo-seconds of observation in the uptime prior (one day at 50 %).
UPTIME_PRIOR_S = 86_400.0
#: Pseudo-gaps in the heartbeat prior.
HEARTBEAT_PRIOR_N = 60.0
#: Pseudo-challenges in the challenge prior.
CHALLENGE_PRIOR_N = 4.0
#: Pseudo-members in the cluster prior.
MEMBER_PRIOR_N = 4.0
#: A failed challenge weighs as much as this many passes.
FAIL_WEIGHT = 3.0
#: A lost member weighs as much as this many completed ones.
LOST_WEIGHT = 2.0
#: Challenge results lose half their weight every 14 days.
CHALLENGE_HALF_LIFE_S = 14 * 86_400.0

WEIGHTS: dict[str, float] = {"uptime": 0.35, "heartbeat": 0.15, "challenge": 0.3, "cluster": 0.2}


@dataclass(frozen=True, slots=True)
class ChallengeResult:
    """One hardware challenge outcome, ``age_s`` seconds before the scoring time."""

    age_s: float
    passed: bool


@dataclass(frozen=True, slots=True)
class ReliabilityInputs:
    """What the coordinator knows about a node over the scoring window.

    ``heartbeat_gap_p95_s`` is None when no gap has been observed yet.
    """

    observed_s: float = 0.0
    online_s: float = 0.0
    heartbeat_interval_s: float = 60.0
    heartbeat_gaps: int = 0
    heartbeat_gap_p95_s: float | None = None
    challenges: tuple[ChallengeResult, ...] = field(default_factory=tuple)
    members_completed: int = 0
    members_lost: int = 0

    def __post_init__(self) -> None:
        for name in ("observed_s", "online_s", "heartbeat_gaps", "members_completed"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not math.isfinite(self.members_lost) or self.members_lost < 0:
            raise ValueError(f"members_lost must be >= 0, got {self.members_lost!r}")
        if self.online_s > self.observed_s:
            raise ValueError(
                f"online_s ({self.online_s}) cannot exceed observed_s ({self.observed_s})"
            )
        if not math.isfinite(self.heartbeat_interval_s) or self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be a positive number")
        p95 = self.heartbeat_gap_p95_s
        if p95 is not None and (math.isnan(p95) or p95 < 0):
            raise ValueError(f"heartbeat_gap_p95_s must be >= 0, got {p95!r}")
        for c in self.challenges:
            if not math.isfinite(c.age_s) or c.age_s < 0:
                raise ValueError(f"challenge age must be a finite number >= 0, got {c.age_s!r}")


@dataclass(frozen=True, slots=True)
class ReliabilityBreakdown:
    """The components and the final score, for the explorer and for debugging placement."""

    uptime: float
    heartbeat: float
    challenge: float
    cluster: float
    score: float


def uptime_component(observed_s: float, online_s: float) -> float:
    return (online_s + UPTIME_PRIOR_S / 2) / (observed_s + UPTIME_PRIOR_S)


def heartbeat_component(interval_s: float, gaps: int, gap_p95_s: float | None) -> float:
    if gaps <= 0 or gap_p95_s is None:
        return 0.5
    regularity = interval_s / max(interval_s, gap_p95_s)
    return (gaps * regularity + HEARTBEAT_PRIOR_N / 2) / (gaps + HEARTBEAT_PRIOR_N)


def recency_weight(age_s: float, half_life_s: float = CHALLENGE_HALF_LIFE_S) -> float:
    """``2^(-age / half_life)``: 1 for a result from now, 0.5 after one half-life."""
    return float(2.0 ** (-age_s / half_life_s))


def challenge_component(challenges: Iterable[ChallengeResult]) -> float:
    passed = 0.0
    failed = 0.0
    for c in challenges:
        w = recency_weight(c.age_s)
        if c.passed:
            passed += w
        else:
            failed += w
    return (CHALLENGE_PRIOR_N / 2 + passed) / (CHALLENGE_PRIOR_N + passed + FAIL_WEIGHT * failed)


def cluster_component(completed: int, lost: int) -> float:
    return (MEMBER_PRIOR_N / 2 + completed) / (MEMBER_PRIOR_N + completed + LOST_WEIGHT * lost)


def _combine(parts: Sequence[tuple[float, float]]) -> float:
    log_sum = sum(weight * math.log(value) for value, weight in parts)
    return min(1.0, max(0.0, math.exp(log_sum)))


def breakdown(inputs: ReliabilityInputs) -> ReliabilityBreakdown:
    """Every component and the combined score (see the module docstring)."""
    u = uptime_component(inputs.observed_s, inputs.online_s)
    h = heartbeat_component(
        inputs.heartbeat_interval_s, inputs.heartbeat_gaps, inputs.heartbeat_gap_p95_s
    )
    c = challenge_component(inputs.challenges)
    m = cluster_component(inputs.members_completed, inputs.members_lost)
    total = _combine(
        [
            (u, WEIGHTS["uptime"]),
            (h, WEIGHTS["heartbeat"]),
            (c, WEIGHTS["challenge"]),
            (m, WEIGHTS["cluster"]),
        ]
    )
    return ReliabilityBreakdown(u, h, c, m, total)


def score(inputs: ReliabilityInputs) -> float:
    """The node's reliability in [0, 1]; exactly 0.5 for a node with no history."""
    return breakdown(inputs).score
