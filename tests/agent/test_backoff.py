from __future__ import annotations

import random

from loom.agent.backoff import Backoff
from loom.agent.config import agent_ws_url


def test_backoff_grows_is_capped_and_jittered() -> None:
    b = Backoff(base_s=0.5, cap_s=8.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert max(delays[-4:]) > 4.0  # reached the cap region
    assert len({round(d, 6) for d in delays}) == len(delays)  # jitter
    b.reset()
    assert b.next_delay() <= 0.5


def test_ws_url() -> None:
    assert agent_ws_url("http://h:1") == "ws://h:1/v1/agent/ws"
    assert agent_ws_url("https://h") == "wss://h/v1/agent/ws"
    assert agent_ws_url("h:2") == "ws://h:2/v1/agent/ws"
