"""A real coordinator on a free loopback port, served by uvicorn in a background thread,
and real agent processes (`python -m loom worker start`)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from loom.agent.netns import driver_prefix
from loom.coordinator.app import create_app
from loom.coordinator.config import Settings
from loom.coordinator.server import new_event_loop, uvicorn_options
from loom.coordinator.state import CoordinatorState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CoordinatorThread:
    """Runs `create_app(settings)` under uvicorn on its own event loop in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.state: CoordinatorState = self.app.state.loom
        config = uvicorn.Config(
            self.app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            lifespan="on",
            **uvicorn_options(),  # what `loom coordinator serve` runs
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def _run(self) -> None:
        self.loop = new_event_loop()  # uvloop where installed, as in production
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    def start(self) -> CoordinatorThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("coordinator thread died during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("coordinator did not start within 30 s")
            time.sleep(0.05)
        return self

    def run_coro(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the coordinator's loop (to reach its state safely)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def agent_env(home: Path, coordinator_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["LOOM_HOME"] = str(home)
    env["LOOM_COORDINATOR"] = coordinator_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


class AgentProcess:
    def __init__(self, home: Path, coordinator_url: str, name: str, *extra: str) -> None:
        self.name = name
        self.log_path = home / f"agent-{name}.log"
        home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loom", "worker", "start", "--name", name, *extra],
            env=agent_env(home, coordinator_url),
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class CoordinatorProcess:
    """`loom coordinator serve` as a real process (so it can be SIGKILLed and restarted)."""

    def __init__(self, home: Path, db_url: str, port: int, *extra: str) -> None:
        self.home = home
        self.db_url = db_url
        self.port = port
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        home.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> CoordinatorProcess:
        import httpx

        log = open(self.home / "coordinator.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "loom", "coordinator", "serve", "--port", str(self.port),
                "--db", self.db_url, "--faucet", *self.extra,
            ],
            env=agent_env(self.home, self.url), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("coordinator did not become healthy")

    def log(self) -> str:
        return (self.home / "coordinator.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def run_spread(cluster: Any, expected: int) -> subprocess.CompletedProcess[str]:
    """Run `loom.examples.spread` against a cluster with its token: a task on every node."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.ray_token)
    return subprocess.run(
        [
            *driver_prefix(cluster.head_address),  # the head's network namespace, if any
            sys.executable,
            "-m",
            "loom.examples.spread",
            cluster.head_address,
            str(expected),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stop_agents(procs: list[AgentProcess]) -> None:
    """SIGTERM every agent (they drain), then make sure each is gone."""
    for p in procs:
        p.kill(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.ensure_dead()
