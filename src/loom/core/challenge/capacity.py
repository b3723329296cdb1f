"""Capacity is measured, not claimed (issue 14 §3).

A CPU is challenged as a whole machine: the NumPy prover's products run through a
multi-threaded BLAS, so the rate the coordinator times is the machine's *aggregate*
throughput. The class's per-core floor (``λ · P_ref`` of the ``cpu`` class: what one
core must at least deliver to pass) turns that rate into the number of cores it can
support; a node is offered at most that many, whatever it claims. A 2-core machine that
claims 64 cores proves the throughput of a few cores and is offered a few.

GPUs are challenged one device at a time, so a GPU count is already what was proven: a
claimed GPU that did not pass is not placeable. Memory (RAM, VRAM) is not measured by the
challenge yet: it stays a claim, bounded at registration, and is not sold as verified.
"""

from __future__ import annotations

import math


def cores_supported(measured_rate: float, per_core_rate: float, claimed: int) -> int:
    """Cores a measured aggregate rate supports: ``floor(rate / per_core)``, in [1, claimed].

    At least 1 (the CPU passed, so it delivered one core's floor), never more than claimed.
    """
    if claimed < 1:
        return 1
    if not math.isfinite(measured_rate) or measured_rate <= 0 or per_core_rate <= 0:
        return 1
    return max(1, min(claimed, int(measured_rate // per_core_rate)))


def offered_units(claimed: int | None, verified: int | None) -> int:
    """Units a device may be offered: its claim, capped by what was measured (if anything)."""
    units = max(1, claimed or 1)
    return units if verified is None else max(1, min(units, verified))
