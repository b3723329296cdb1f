"""Overlay certificates through a real coordinator (issue 10): the agent's own key, renewal
while the cluster lives, none after it ended, and users' certificates for their own key.

Real coordinator, database, lighthouse (no tun: no root needed) and ``nebula-cert``; the
agents are the protocol-level fakes, behind a transport that answers the two overlay
commands the way a real agent does (``nebula-cert keygen`` here; a certificate swap
acknowledged) and passes every other command to the fake over its WebSocket.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loom.client.cli.connect import stay, user_config
from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.agent_client import AgentClient
from loom.coordinator.config import Settings
from loom.coordinator.overlay.service import current, renew_step
from loom.protocol.messages import Ack
from loom.protocol.overlay import OverlayGrant
from support.fakeagent import FakeAgents, force_available
from support.servers import CoordinatorThread, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("nebula") is None or shutil.which("nebula-cert") is None,
    reason="Nebula is not installed (apt-get install nebula)",
)


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    settings.overlay_listen = f"127.0.0.1:{free_port()}"
    settings.overlay_dir = str(tmp_path / "overlay")
    settings.overlay_cert_lifetime_s = 3600.0
    return settings


def keygen(directory: Path) -> tuple[str, str]:
    """(private, public) PEM, as ``nebula-cert keygen`` writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    key, pub = directory / "k.key", directory / "k.pub"
    subprocess.run(
        ["nebula-cert", "keygen", "-out-key", str(key), "-out-pub", str(pub)], check=True
    )
    return key.read_text(), pub.read_text()


def cert_info(tmp: Path, crt: str) -> dict[str, Any]:
    path = tmp / "print.crt"
    path.write_text(crt)
    out = subprocess.run(
        ["nebula-cert", "print", "-json", "-path", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    details: dict[str, Any] = json.loads(out)["details"]
    return details


def public_hex(tmp: Path, pub_pem: str) -> str:
    """The hex public key nebula-cert prints for a certificate signed for ``pub_pem``."""
    # A throwaway CA signs it: the public key in any certificate for it is the same.
    d = tmp / "probe"
    d.mkdir(exist_ok=True)
    subprocess.run(["nebula-cert", "ca", "-name", "p"], cwd=d, check=True, capture_output=True)
    (d / "in.pub").write_text(pub_pem)
    subprocess.run(
        ["nebula-cert", "sign", "-name", "x", "-ip", "10.9.9.9/24", "-in-pub", "in.pub"],
        cwd=d,
        check=True,
        capture_output=True,
    )
    key: str = cert_info(tmp, (d / "x.crt").read_text())["publicKey"]
    shutil.rmtree(d)
    return key


class AgentSide(AgentClient):
    """The coordinator's transport, answering the overlay commands as an agent would."""

    def __init__(self, base: AgentClient, keys: Path) -> None:
        super().__init__(base.hub)
        self.keys = keys
        #: member id -> (private, public) PEM generated "on the agent"
        self.generated: dict[str, tuple[str, str]] = {}
        #: every member.overlay_cert received: (member id, crt, expires_at)
        self.renewals: list[tuple[str, str, float]] = []

    async def _send(self, node_id: str, name: str, args_json: str, timeout: float) -> Ack:
        args = json.loads(args_json)
        if name == "member.overlay_key":
            member = str(args["member_id"])
            if member not in self.generated:
                self.generated[member] = keygen(self.keys / member)
            return Ack(id="k", ok=True, result={"public_key": self.generated[member][1]})
        if name == "member.overlay_cert":
            self.renewals.append((args["member_id"], args["crt"], float(args["expires_at"])))
            return Ack(id="c", ok=True, result={"reloaded": True})
        return await super()._send(node_id, name, args_json, timeout)


@pytest.fixture
def agents(coordinator: CoordinatorThread, tmp_path: Path) -> Iterator[FakeAgents]:
    state = coordinator.state
    state.agents = AgentSide(state.agents, tmp_path / "agent-keys")
    fakes = FakeAgents(coordinator.url)
    try:
        yield fakes
    finally:
        fakes.close()


def _available(coordinator: CoordinatorThread, fakes: FakeAgents, n: int) -> None:
    for i in range(n):
        node = fakes.add(f"a{i}", price=f"0.{i + 1}")
        coordinator.run_coro(force_available(coordinator.state.sessions, [node.node_id]))


def test_keys_stay_with_agents_and_certificates_renew_while_the_cluster_lives(
    coordinator: CoordinatorThread, client: LoomClient, agents: FakeAgents, tmp_path: Path
) -> None:
    side = coordinator.state.agents
    assert isinstance(side, AgentSide)
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    _available(coordinator, agents, 2)
    client.create_cluster({"name": "c", "nodes": 2, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("c", timeout=30)
    assert cluster.state == "running", cluster.reason
    # member.start carried a certificate for the agent's own public key, and no key at all.
    assert len(agents.started) == 2
    for args in agents.started:
        overlay = args["overlay"]
        assert "key" not in overlay and "PRIVATE" not in json.dumps(args)
        grant = OverlayGrant.model_validate(overlay)
        info = cert_info(tmp_path, grant.crt)
        member = args["member_id"]
        assert info["name"] == member and info["groups"] == [cluster.id]
        assert info["publicKey"] == public_hex(tmp_path, side.generated[member][1])
        assert grant.expires_at - time.time() == pytest.approx(3600, abs=60)  # the lifetime
    # Nothing is due yet; 50 minutes on (< 1/3 of the hour left) both are renewed and pushed.
    assert coordinator.run_coro(renew_step(coordinator.state, time.time() + 60)) == []
    later = time.time() + 50 * 60
    renewed = coordinator.run_coro(renew_step(coordinator.state, later))
    assert sorted(renewed) == sorted(m.id for m in cluster.members)
    for member, crt, expires_at in side.renewals:
        info = cert_info(tmp_path, crt)
        assert info["publicKey"] == public_hex(tmp_path, side.generated[member][1])
        assert info["groups"] == [cluster.id]
        # The configured hour, or the cluster's planned end (+ 5 min) if that is sooner.
        assert expires_at == pytest.approx(min(later + 3600, cluster.expires_at + 300), abs=5)
    assert coordinator.run_coro(renew_step(coordinator.state, later + 60)) == []  # not again
    # An ended cluster's members get no renewal, and their addresses are free again.
    assert client.delete_cluster("c").state == "terminated"
    pushed = len(side.renewals)
    assert coordinator.run_coro(renew_step(coordinator.state, later + 3 * 3600)) == []
    assert len(side.renewals) == pushed
    overlay = current(coordinator.state)
    assert overlay is not None
    book = overlay.book
    assert all(coordinator.run_coro(book.address_of(m.id)) is None for m in cluster.members)


def test_user_certificate_is_for_the_users_own_key(
    coordinator: CoordinatorThread, client: LoomClient, agents: FakeAgents, tmp_path: Path
) -> None:
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    _available(coordinator, agents, 1)
    client.create_cluster({"name": "u", "nodes": 1, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("u", timeout=30)
    assert cluster.state == "running", cluster.reason
    _, pub = keygen(tmp_path / "user")
    raw = client.request(
        "POST", f"/v1/clusters/{cluster.id}/overlay", json={"public_key": pub}
    ).json()
    assert "key" not in raw
    grant = OverlayGrant.model_validate(raw)
    info = cert_info(tmp_path, grant.crt)
    assert info["groups"] == [cluster.id]
    assert info["publicKey"] == public_hex(tmp_path, pub)
    # A private key (or anything but a public key) is refused with what to send instead.
    key_pem = (tmp_path / "user" / "k.key").read_text()
    for body in ({"public_key": key_pem}, {}, {"public_key": "hello"}):
        with pytest.raises(LoomAPIError) as err:
            client.request("POST", f"/v1/clusters/{cluster.id}/overlay", json=body)
        assert err.value.status == 400, err.value
        assert "public" in err.value.message.lower() or "public_key" in str(err.value.field)
    # Renewal (connect renews while it runs): the same name, address, key; a later expiry.
    name = cert_info(tmp_path, grant.crt)["name"]
    time.sleep(1.1)  # Nebula's validity is in whole seconds: a later one is a new certificate
    raw = client.request(
        "POST", f"/v1/clusters/{cluster.id}/overlay/{name}/renew", json={"public_key": pub}
    ).json()
    fresh = OverlayGrant.model_validate(raw)
    renewed = cert_info(tmp_path, fresh.crt)
    assert (renewed["name"], fresh.overlay_ip) == (name, grant.overlay_ip)
    assert renewed["publicKey"] == info["publicKey"] and fresh.expires_at > grant.expires_at
    assert fresh.crt != grant.crt and fresh.lighthouses() == grant.lighthouses()
    # Another key, another cluster's name, a member's name: refused, saying what to do.
    _, other = keygen(tmp_path / "other")
    refusals = (
        (name, {"public_key": other}, 409, "overlay_key_mismatch"),
        ("u-nosuch", {"public_key": pub}, 404, "overlay_certificate_not_found"),
        (cluster.members[0].id, {"public_key": pub}, 404, "overlay_certificate_not_found"),
    )
    for who, body, status, code in refusals:
        with pytest.raises(LoomAPIError) as err:
            client.request("POST", f"/v1/clusters/{cluster.id}/overlay/{who}/renew", json=body)
        assert (err.value.status, err.value.code) == (status, code), err.value
    # Revoked: no more renewals for it.
    client.request("DELETE", f"/v1/clusters/{cluster.id}/overlay/{name}")
    with pytest.raises(LoomAPIError) as err:
        client.request(
            "POST", f"/v1/clusters/{cluster.id}/overlay/{name}/renew", json={"public_key": pub}
        )
    assert err.value.status == 404


def test_connect_renews_its_certificate_while_it_runs(
    coordinator: CoordinatorThread, client: LoomClient, agents: FakeAgents, tmp_path: Path
) -> None:
    """`loom cluster connect`'s loop (``stay``) with a real Nebula (tun disabled: no root
    needed) and the real API: once a third of the lifetime is left (the clock moved on),
    it renews, swaps the file and Nebula reloads it; a failed renewal is retried."""
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    _available(coordinator, agents, 1)
    client.create_cluster({"name": "s", "nodes": 1, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("s", timeout=30)
    assert cluster.state == "running", cluster.reason
    d = tmp_path / "connect"
    d.mkdir()
    subprocess.run(
        ["nebula-cert", "keygen", "-out-key", str(d / "user.key"), "-out-pub", str(d / "u.pub")],
        check=True,
    )
    pub = (d / "u.pub").read_text()
    grant = OverlayGrant.model_validate(
        client.request(
            "POST", f"/v1/clusters/{cluster.id}/overlay", json={"public_key": pub}
        ).json()
    )
    (d / "ca.crt").write_text(grant.ca_crt)
    (d / "user.crt").write_text(grant.crt)
    config = user_config(grant, d) | {"tun": {"disabled": True}, "logging": {"level": "info"}}
    (d / "config.yml").write_text(json.dumps(config))
    log = open(d / "nebula.log", "wb")
    proc = subprocess.Popen(
        ["nebula", "-config", str(d / "config.yml")], stdout=log, stderr=subprocess.STDOUT
    )
    name = cert_info(tmp_path, grant.crt)["name"]
    offset = [0.0]
    calls: list[str] = []
    said: list[str] = []

    def renew() -> OverlayGrant:
        calls.append(name)
        if len(calls) == 1:
            raise LoomAPIError(503, "unavailable", "the coordinator is restarting (test)")
        got = client.request(
            "POST", f"/v1/clusters/{cluster.id}/overlay/{name}/renew", json={"public_key": pub}
        ).json()
        return OverlayGrant.model_validate(got)

    taken: list[int] = []
    loop = threading.Thread(
        target=lambda: taken.append(
            stay(proc, grant, d / "user.crt", renew, lambda: time.time() + offset[0], said.append)
        )
    )
    try:
        loop.start()
        time.sleep(1.5)
        assert calls == []  # not due yet
        offset[0] = 2500.0  # 1100 s of 3600 left: due
        deadline = time.time() + 30
        while time.time() < deadline and "Client cert refreshed from disk" not in (
            d / "nebula.log"
        ).read_text(errors="replace"):
            time.sleep(0.2)
        assert "Client cert refreshed from disk" in (d / "nebula.log").read_text(errors="replace")
        assert len(calls) == 2 and "failed" in said[0] and "renewed" in said[1], said
        assert (d / "user.crt").read_text() != grant.crt
        assert cert_info(tmp_path, (d / "user.crt").read_text())["name"] == name
    finally:
        proc.terminate()
        loop.join(15)
        log.close()
    assert taken == [1] and not loop.is_alive()
