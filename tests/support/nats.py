"""The NATS server the replica tests use (127.0.0.1:4222; `.ci/run` starts one if missing)."""

from __future__ import annotations

import socket

import pytest

NATS_URL = "nats://127.0.0.1:4222"


def nats_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1):
            return True
    except OSError:
        return False


#: Mark a module whose tests need the NATS server.
needs_nats = pytest.mark.skipif(
    not nats_up(), reason="no NATS server on 127.0.0.1:4222 (start nats-server)"
)
