"""Rate from root arrival times on the coordinator's clock (``hardware-challenge.md`` §6.6).

The rate is a *slope*: over a window of w rounds, ``w·W_r / (t[a+w] − t[a])``. A constant
one-way latency cancels; banking and bursting gains at most w/(w−d) because nonces are
released one round at a time. The best window over the run is scored, so transient stalls
cost an honest prover nothing as long as one window runs clean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowScore:
    """The fastest window: rounds ``start+1 .. start+window`` timed from t[start]."""

    start: int
    window: int
    seconds: float
    rate: float

    @property
    def rounds(self) -> range:
        """The rounds computed inside the window (where in-window openings are drawn)."""
        return range(self.start + 1, self.start + self.window + 1)


def best_window(arrivals: Sequence[float], window: int, ops_per_round: int) -> WindowScore | None:
    """Fastest ``window``-round stretch of ``arrivals`` (t of root 0, 1, …), or None if too few.

    A window of zero seconds (all roots at one instant) scores an infinite rate; nonce
    gating makes that impossible when ``window`` exceeds the pipeline depth.
    """
    if window < 1 or len(arrivals) < window + 1:
        return None
    best_start, best_dt = 0, math.inf
    for a in range(len(arrivals) - window):
        dt = arrivals[a + window] - arrivals[a]
        if dt < best_dt:
            best_start, best_dt = a, dt
    rate = math.inf if best_dt <= 0 else window * ops_per_round / best_dt
    return WindowScore(start=best_start, window=window, seconds=best_dt, rate=rate)


def format_rate(ops_per_s: float | None) -> str:
    """Human form of an INT8 ops/s figure, e.g. ``1.48 POPS``, ``27.1 GOPS``."""
    if ops_per_s is None:
        return "n/a"
    if math.isinf(ops_per_s):
        return "∞ OPS"
    for unit, scale in (("POPS", 1e15), ("TOPS", 1e12), ("GOPS", 1e9), ("MOPS", 1e6)):
        if ops_per_s >= scale:
            return f"{ops_per_s / scale:.3g} {unit}"
    return f"{ops_per_s:.3g} OPS"
