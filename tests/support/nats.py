"""The NATS server the replica tests use (127.0.0.1:4222; `.ci/run` starts one if missing)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

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


class NatsServer:
    """A nats-server of the test's own on a free loopback port, with the options given
    (``--user/--pass``, ``--auth TOKEN``); ``stop()`` kills it (and only it)."""

    def __init__(self, *options: str) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            pytest.skip("nats-server is not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(self.port), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nats-server {' '.join(options)} did not start") from None
                time.sleep(0.05)

    def url(self, userinfo: str = "") -> str:
        return f"nats://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
