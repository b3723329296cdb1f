"""Shared fixtures: an isolated database, a real coordinator, a keyed client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.client.sdk import LoomClient
from loom.coordinator.config import Settings
from loom.protocol.identity import KeyPair
from support.db import isolated_db
from support.fakeagent import FakeAgents
from support.servers import CoordinatorThread, free_port


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    with isolated_db(tmp_path) as url:
        yield url


@pytest.fixture
def loom_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LOOM_HOME", str(home))
    monkeypatch.delenv("LOOM_COORDINATOR", raising=False)
    monkeypatch.delenv("LOOM_KEY", raising=False)
    return home


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        db_url=db_url,
        port=free_port(),
        heartbeat_timeout_s=15.0,
        heartbeat_interval_s=1.0,
        heartbeat_flush_s=0.2,
        watchdog_interval_s=0.25,
        faucet=True,
        tune_gc=False,
        restart_grace_s=0.0,  # tests start agents after the coordinator, never before
    )


@pytest.fixture
def coordinator(settings: Settings) -> Iterator[CoordinatorThread]:
    server = CoordinatorThread(settings).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def user_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture
def client(coordinator: CoordinatorThread, user_key: KeyPair) -> Iterator[LoomClient]:
    with LoomClient(coordinator.url, user_key) as c:
        yield c


@pytest.fixture
def fakes(coordinator: CoordinatorThread) -> Iterator[FakeAgents]:
    """Fake agents (real WebSockets, no Ray) attached to the test's coordinator."""
    agents = FakeAgents(coordinator.url)
    try:
        yield agents
    finally:
        agents.close()
