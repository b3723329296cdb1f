"""How uvicorn serves the coordinator: one set of settings for `loom coordinator serve`,
the tests' in-thread coordinator and the heartbeat benches.

Measured on a 2-core VM (bench/heartbeats_bare.py, 1,000 agents at 5,000 beats/s, CPU per
beat of the server with no app; bench/RESULTS.md, fourth session): uvicorn's
``websockets-sansio`` implementation is its cheapest (its legacy ``websockets`` one and
``wsproto`` cost 1.2–1.4× as much), and uvloop under it takes about a third off again,
below even a bare ``websockets.asyncio.server`` on asyncio's own loop. Where uvloop is not
installed (it is a dependency everywhere but Windows), asyncio's loop serves.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from typing import Any, Literal

from loom.protocol.messages import MAX_FRAME_BYTES

#: uvicorn's WebSocket implementation (its default; named so an upgrade cannot swap it).
WS_IMPL = "websockets-sansio"


def loop_name() -> Literal["uvloop", "asyncio"]:
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop of the kind :func:`uvicorn_options` asks for."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if loop_name() == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    return factory()


def uvicorn_options() -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config`` besides app, host, port."""
    return {
        "ws": WS_IMPL,
        "loop": loop_name(),
        "ws_max_size": MAX_FRAME_BYTES,
        # Control frames are ~100 bytes: deflate costs CPU and saves nothing.
        "ws_per_message_deflate": False,
        "ws_ping_interval": 20,
        "ws_ping_timeout": 20,
        "access_log": False,
    }
