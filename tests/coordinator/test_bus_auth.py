"""NATS authentication for coordinator replicas (issue 11 §7): credentials in the URL
(user/password or token) or in a file, never a secret in a log line or an error, and a
wrong credential is one clear line from `loom coordinator serve` (exit 2).

Each test starts its own nats-server on a free port with ``--user/--pass`` or ``--auth``
and kills it at the end; skipped when nats-server is not installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom.coordinator.replicas.bus import NatsBus
from loom.coordinator.replicas.link import (
    BusAuthFailed,
    BusConfigError,
    BusUnavailable,
    NatsLink,
    read_creds,
    redact,
)
from loom.protocol.events import ChangeCause, NodeChanged
from support.nats import NatsServer

USER, PASSWORD, TOKEN = "loom", "pa55-w0rd.x9", "t0ken-s3cret"
SECRETS = (PASSWORD, TOKEN, "wr0ng-pass")


@pytest.fixture
def userpass() -> Iterator[NatsServer]:
    server = NatsServer("--user", USER, "--pass", PASSWORD)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def token_server() -> Iterator[NatsServer]:
    server = NatsServer("--auth", TOKEN)
    try:
        yield server
    finally:
        server.stop()


def _clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret leaked: {text!r}"


def test_redact_hides_every_password_and_token() -> None:
    assert redact("nats://u:p@h:4222,nats://tok@h2:4222,nats://h3:4222") == (
        "nats://u:***@h:4222,nats://***@h2:4222,nats://h3:4222"
    )
    assert redact("tls://u:p@ss@h:1") == "tls://u:***@h:1"  # the last @ ends the userinfo
    assert redact("nats://u:a/b@h:1") == "nats://u:***@h:1"  # a / hides nothing


async def test_user_and_password_in_the_url_carry_events(
    userpass: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = userpass.url(f"{USER}:{PASSWORD}")
    links = [NatsLink(url, f"r{i}") for i in (1, 2)]
    buses = [NatsBus(link) for link in links]
    for link, bus in zip(links, buses, strict=True):
        await link.start()
        await bus.start()
    try:
        heard: list[object] = []
        buses[1].subscribe(heard.append)
        event = NodeChanged(node_id="n1", cause=ChangeCause.ALLOCATION)
        buses[0].publish(event)
        for _ in range(200):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard == [event]
    finally:
        for link, bus in zip(links, buses, strict=True):
            await bus.close()
            await link.close()
    assert "joined the bus at nats://loom:***@127.0.0.1" in caplog.text
    _clean(caplog.text)


async def test_a_wrong_or_missing_credential_is_refused_without_the_secret(
    userpass: NatsServer, token_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BusAuthFailed, match="refused our credentials") as wrong:
        await NatsLink(userpass.url(f"{USER}:wr0ng-pass"), "r1").start()
    assert "nats://loom:***@127.0.0.1" in str(wrong.value)
    with pytest.raises(BusAuthFailed, match="requires credentials"):
        await NatsLink(userpass.url(), "r1").probe()
    with pytest.raises(BusAuthFailed, match="refused our credentials") as bad_token:
        await NatsLink(token_server.url("wr0ng-pass"), "r1").probe()
    _clean(str(wrong.value) + str(bad_token.value) + caplog.text)


async def test_credentials_from_a_file(
    userpass: NatsServer, token_server: NatsServer, tmp_path: Path
) -> None:
    creds = tmp_path / "bus.creds"
    creds.write_text(f"{USER}:{PASSWORD}\n")
    creds.chmod(0o600)
    link = NatsLink(userpass.url(), "r1", str(creds))
    await link.start()
    await link.close()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    await NatsLink(token_server.url(), "r1", str(token)).probe()
    # The link reads $LOOM_BUS_CREDS when the app builds it without one.
    os.environ["LOOM_BUS_CREDS"] = str(token)
    try:
        assert NatsLink(token_server.url(), "r1").creds == str(token)
    finally:
        del os.environ["LOOM_BUS_CREDS"]
    with pytest.raises(BusConfigError, match="given twice"):
        await NatsLink(userpass.url(f"{USER}:x"), "r1", str(creds)).probe()
    with pytest.raises(BusConfigError, match="cannot read"):
        read_creds(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BusConfigError, match="empty"):
        read_creds(str(tmp_path / "empty"))


async def test_an_unreachable_bus_fails_at_once() -> None:
    with pytest.raises(BusUnavailable, match="cannot reach") as info:
        await asyncio.wait_for(NatsLink("nats://127.0.0.1:1", "r1").start(), 30)
    assert not isinstance(info.value, BusAuthFailed)


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom", "coordinator", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_serve_with_a_wrong_credential_exits_with_one_line(
    userpass: NatsServer, tmp_path: Path
) -> None:
    env = dict(os.environ, LOOM_HOME=str(tmp_path))
    db = "postgresql://postgres@127.0.0.1:5432/test"
    done = _serve("--db", db, "--bus", userpass.url(f"{USER}:wr0ng-pass"), env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the NATS server at nats://loom:***@")
    assert "refused our credentials" in lines[0] and "Traceback" not in done.stderr
    _clean(done.stdout + done.stderr)
    # The same from the environment (the URL kept off the command line).
    env["LOOM_BUS"] = userpass.url()
    done = _serve("--db", db, env=env)
    assert done.returncode == 2 and "requires credentials" in done.stderr, done.stderr
