"""Capped exponential backoff with jitter, for reconnecting to the coordinator."""

from __future__ import annotations

import random


class Backoff:
    def __init__(
        self, base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The next wait: min(cap, base·2ⁿ) scaled by a jitter in [0.5, 1]."""
        ceiling = min(self.cap_s, self.base_s * float(1 << self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return ceiling * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        self.attempt = 0
