"""Revoked overlay certificates (issue 10's hole): a removed member's Nebula, still running
with its unexpired certificate and its own key, is shut out.

Part 1, as the adversary, with real namespaces and real Nebula (the agent's code,
:class:`loom.agent.overlay.MemberOverlay`; the coordinator's CA and lighthouse): a head
(``m-head``) serves TCP; ``m-good`` and ``m-bad`` both reach it. ``m-bad`` is revoked
(the authority's blocklist, reloaded by the lighthouse and by every remaining member, as
``member.overlay_blocklist`` does on their agents). Then:

- ``m-bad``'s open tunnel is closed and it can no longer open a TCP connection to the
  head, while ``m-good`` still can;
- ``m-bad`` restarted with the same certificate and key (a supplier who kept them) gets
  no handshake from the head nor from the lighthouse (so no relay either);
- a member that joins later (``m-late``) has the blocklist in its grant and refuses
  ``m-bad`` (which goes straight to its UDP address) too, while ``m-good`` reaches it.

Part 2, through a real coordinator: a member marked lost produces ``member.overlay_blocklist``
with that member's certificate fingerprint, to the remaining member's agent only, and
its replacement's ``member.start`` grant carries it; the owner revokes a user certificate
(``DELETE /v1/clusters/{ref}/overlay/{name}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loom.agent.netns import MemberNet, NetnsManager, unavailable_reason
from loom.agent.overlay import NEBULA_PORT, MemberOverlay, generate_key, member_config
from loom.client.sdk import LoomAPIError, LoomClient
from loom.coordinator.agent_client import AgentClient
from loom.coordinator.config import Settings
from loom.coordinator.hub import AgentNotConnected
from loom.coordinator.loops.cluster_events import member_lost
from loom.coordinator.overlay.authority import fingerprint
from loom.coordinator.overlay.service import current, revoke, revoke_step
from loom.protocol.messages import Ack
from loom.protocol.overlay import OverlayGrant
from support.fakeagent import FakeAgents, force_available
from support.overlay_book import standalone_overlay
from support.servers import CoordinatorThread, free_port

nebula = pytest.mark.skipif(
    shutil.which("nebula") is None or shutil.which("nebula-cert") is None,
    reason="Nebula is not installed (apt-get install nebula)",
)

PORT = 7200
SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT)); s.listen(16); print("up", flush=True)
while True:
    c, _ = s.accept(); c.close()
""".replace("PORT", str(PORT))


def _in(net: MemberNet) -> list[str]:
    return ["nsenter", f"--net={net.path}", "--"]


def _connects(net: MemberNet, host: str, timeout: float = 2.0) -> bool:
    code = f"import socket; socket.create_connection(({host!r}, {PORT}), timeout={timeout})"
    done = subprocess.run([*_in(net), sys.executable, "-c", code], capture_output=True)
    return done.returncode == 0


async def _until(check: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``check()`` held (None: not within ``timeout``)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if await asyncio.to_thread(check):
            return time.monotonic() - began
        await asyncio.sleep(0.2)
    return None


def _nebula(net: MemberNet, path: Path, config: dict[str, object]) -> subprocess.Popen[bytes]:
    """A Nebula of the adversary's own making, in ``net``, logging next to its config."""
    path.write_text(json.dumps(config))
    with open(path.with_suffix(".log"), "ab") as out:
        return subprocess.Popen(
            [*_in(net), "nebula", "-config", str(path)], stdout=out, stderr=subprocess.STDOUT
        )


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _printed_fingerprint(tmp: Path, crt: str) -> str:
    path = tmp / "print.crt"
    path.write_text(crt)
    out = subprocess.run(
        ["nebula-cert", "print", "-json", "-path", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    value: str = json.loads(out)["fingerprint"]
    return value


@nebula
@pytest.mark.slow
@pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"needs root, nftables ({unavailable_reason()})"
)
async def test_a_revoked_member_is_shut_out_by_members_and_lighthouse(tmp_path: Path) -> None:
    stack = contextlib.AsyncExitStack()
    standalone = await stack.enter_async_context(standalone_overlay(tmp_path, "10.251.9.0/24"))
    book, lighthouse = standalone.book, standalone.lighthouse
    netns = NetnsManager(f"loom-v{secrets.token_hex(3)}")
    nets: dict[str, MemberNet] = {}
    overlays: dict[str, MemberOverlay] = {}
    procs: list[subprocess.Popen[bytes]] = []

    async def member(name: str) -> MemberOverlay:
        net = await asyncio.to_thread(netns.create, secrets.token_hex(5), "c1")
        nets[name] = net
        where = tmp_path / name / "nebula"
        public = await asyncio.to_thread(generate_key, where)
        grant = await book.grant("c1", name, None, public)
        overlay = MemberOverlay(grant, net, where, netns)
        overlays[name] = overlay
        await overlay.start()
        return overlay

    def serve(overlay: MemberOverlay) -> None:
        proc = subprocess.Popen([*_in(overlay.net), sys.executable, "-c", SERVER], stdout=-1)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"

    try:
        head, good, bad = [await member(n) for n in ("m-head", "m-good", "m-bad")]
        serve(head)
        hip = head.grant.overlay_ip
        assert await _until(lambda: _connects(good.net, hip), 20) is not None, good.log_tail()
        assert await _until(lambda: _connects(bad.net, hip), 20) is not None, bad.log_tail()
        bad_crt = bad.grant.crt
        # What the authority blocks is Nebula's own fingerprint of the member's certificate.
        began = time.monotonic()
        blocked = await book.revoke(["m-bad"])
        assert blocked == [_printed_fingerprint(tmp_path, bad_crt)] == [fingerprint(bad_crt)]
        assert await book.address_of("m-bad") is None
        # The coordinator's push: the lighthouse, and each remaining member (its agent).
        listed = await book.blocklist("c1")
        assert await standalone.reload_lighthouse(), lighthouse.log_tail()
        assert all(await asyncio.gather(head.block(listed), good.block(listed)))
        reloaded_s = time.monotonic() - began
        # The revoked member's open tunnel is closed at the head's next check; then it
        # cannot connect, while the good member still can.
        shut = await _until(lambda: not _connects(bad.net, hip, 1.0), 40)
        assert shut is not None, head.log_tail(10)
        assert await asyncio.to_thread(_connects, good.net, hip)
        print(f"\nrevocation: reloaded in {reloaded_s:.2f} s, open tunnel shut after {shut:.1f} s")
        torn = 'certName=m-bad error="certificate has been blocked"'
        assert torn in head.log_path.read_text(errors="replace"), head.log_tail(10)
        lighthouse_shut = await _until(lambda: torn in _text(lighthouse.log_path), 30)
        assert lighthouse_shut is not None, lighthouse.log_tail(10)
        print(f"lighthouse tunnel shut after {shut + lighthouse_shut:.1f} s")
        # The supplier restarts its Nebula with the same certificate and key: refused.
        assert bad.proc is not None
        bad.proc.kill()
        await bad.proc.wait()
        bad.proc = None
        at_head, at_lighthouse = _size(head.log_path), _size(lighthouse.log_path)
        # It knows where the head is (no lighthouse answer needed): straight to its UDP.
        config = member_config(bad.grant, bad.net, bad.dir, [])
        hosts = config["static_host_map"]
        assert isinstance(hosts, dict)
        hosts[hip] = [f"{head.net.ns_ip}:{NEBULA_PORT}"]
        evil = _nebula(bad.net, bad.dir / "evil.yml", config)
        procs.append(evil)
        assert await _until(bad._tun_ready, 10) is not None
        assert await _until(lambda: _connects(bad.net, hip, 1.0), 10) is None
        for log_path in (head.log_path, lighthouse.log_path):
            since = log_path.read_text(errors="replace")[
                at_head if log_path == head.log_path else at_lighthouse :
            ]
            refusals = [ln for ln in since.splitlines() if "Invalid certificate from host" in ln]
            assert refusals, (log_path, since[-1500:])
            assert all("Name: m-bad" in ln and "has been blocked" in ln for ln in refusals)
        # A member that joins now is protected by its grant alone.
        late = await member("m-late")
        assert late.grant.blocklist == blocked
        # ... at an address of its own: the revoked one's stays taken until its cert expires.
        assert late.grant.overlay_ip != bad.grant.overlay_ip
        serve(late)
        lip = late.grant.overlay_ip
        assert await _until(lambda: _connects(good.net, lip), 20) is not None, late.log_tail()
        # The adversary, told where m-late is, goes straight to it: m-late refuses it.
        evil.kill()
        evil.wait()
        await asyncio.sleep(0.5)  # its tun device goes with it
        hosts[lip] = [f"{late.net.ns_ip}:{NEBULA_PORT}"]
        at_late = _size(late.log_path)
        evil = _nebula(bad.net, bad.dir / "evil.yml", config)
        procs.append(evil)
        assert await _until(bad._tun_ready, 10) is not None
        assert await _until(lambda: _connects(bad.net, lip, 1.0), 8) is None
        since = _text(late.log_path)[at_late:]
        refusals = [ln for ln in since.splitlines() if "Invalid certificate from host" in ln]
        assert refusals, since[-1500:]
        assert all("Name: m-bad" in ln and "has been blocked" in ln for ln in refusals)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for o in overlays.values():
            await o.stop()
        for net in nets.values():
            await asyncio.to_thread(netns.destroy, net)
        await stack.aclose()


# -- part 2: the coordinator's path ---------------------------------------------------------


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    settings.overlay_listen = f"127.0.0.1:{free_port()}"
    settings.overlay_dir = str(tmp_path / "overlay")
    return settings


class AgentSide(AgentClient):
    """The transport, answering the overlay commands as an agent does; records blocklists."""

    def __init__(self, base: AgentClient, keys: Path) -> None:
        super().__init__(base.hub)
        self.keys = keys
        #: every member.overlay_blocklist received: (node id, args)
        self.blocklists: list[tuple[str, dict[str, object]]] = []
        #: nodes whose blocklist commands do not get through (a link down for a moment)
        self.unreachable: set[str] = set()

    async def _send(self, node_id: str, name: str, args_json: str, timeout: float) -> Ack:
        args = json.loads(args_json)
        if name == "member.overlay_key":
            where = self.keys / str(args["member_id"])
            return Ack(id="k", ok=True, result={"public_key": generate_key(where)})
        if name == "member.overlay_blocklist":
            if node_id in self.unreachable:
                raise AgentNotConnected(f"{node_id} is unreachable (test)")
            self.blocklists.append((node_id, args))
            return Ack(id="b", ok=True, result={"reloaded": []})
        return await super()._send(node_id, name, args_json, timeout)


@pytest.fixture
def agents(coordinator: CoordinatorThread, tmp_path: Path) -> Iterator[FakeAgents]:
    coordinator.state.agents = AgentSide(coordinator.state.agents, tmp_path / "keys")
    fakes = FakeAgents(coordinator.url)
    try:
        yield fakes
    finally:
        fakes.close()


@nebula
def test_a_lost_member_is_revoked_to_the_remaining_members(
    coordinator: CoordinatorThread, client: LoomClient, agents: FakeAgents
) -> None:
    side = coordinator.state.agents
    assert isinstance(side, AgentSide)
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    nodes = [agents.add(f"a{i}", price=f"0.{i + 1}") for i in range(3)]
    for node in nodes[:2]:
        coordinator.run_coro(force_available(coordinator.state.sessions, [node.node_id]))
    client.create_cluster({"name": "c", "nodes": 2, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("c", timeout=30)
    assert cluster.state == "running", cluster.reason
    assert side.blocklists == []  # nothing revoked yet
    grants = {a["member_id"]: OverlayGrant.model_validate(a["overlay"]) for a in agents.started}
    head = next(m for m in cluster.members if m.role == "head")
    worker = next(m for m in cluster.members if m.role == "worker")
    # A third node appears; the worker is lost: the cluster heals onto the new node.
    coordinator.run_coro(force_available(coordinator.state.sessions, [nodes[2].node_id]))
    coordinator.run_coro(member_lost(coordinator.state, worker.id, "cut off (test)"))
    deadline = time.time() + 30
    while time.time() < deadline and len(agents.started) < 3:
        time.sleep(0.1)
    assert len(agents.started) == 3, client.get_cluster("c")
    expected = [fingerprint(grants[worker.id].crt)]
    # The remaining member's agent got the cluster's full blocklist: the lost one's cert.
    assert side.blocklists, "no member.overlay_blocklist sent"
    node_id, args = side.blocklists[0]
    assert node_id == head.node_id
    assert args == {"cluster_id": cluster.id, "fingerprints": expected}
    assert worker.node_id not in {n for n, _ in side.blocklists}
    # The replacement starts with it in its grant; the lighthouse blocks it too.
    replacement = OverlayGrant.model_validate(agents.started[2]["overlay"])
    assert replacement.blocklist == expected
    overlay = current(coordinator.state)
    assert overlay is not None
    assert overlay.lighthouse_list == tuple(expected)
    config = json.loads(overlay.lighthouse.config_path.read_text())
    assert config["pki"]["blocklist"] == expected
    # The overlay loop pushes again to an agent that has not confirmed the list, once.
    side.blocklists.clear()
    overlay.pushed.clear()
    coordinator.run_coro(revoke_step(coordinator.state))
    live = {m.node_id for m in client.wait_cluster("c", timeout=30).members if m.state == "ready"}
    assert {n for n, _ in side.blocklists} == live and len(live) == 2
    pushes = len(side.blocklists)
    coordinator.run_coro(revoke_step(coordinator.state))
    assert len(side.blocklists) == pushes
    # The cluster's end revokes the rest (no member left to tell: the lighthouse blocks).
    assert client.delete_cluster("c").state == "terminated"
    everything = coordinator.run_coro(overlay.book.blocklist())
    assert len(everything) == 3 and expected[0] in everything
    assert json.loads(overlay.lighthouse.config_path.read_text())["pki"]["blocklist"] == everything


@nebula
def test_an_agent_that_missed_the_blocklist_gets_it_within_seconds(
    coordinator: CoordinatorThread, client: LoomClient, agents: FakeAgents
) -> None:
    """The head's agent is unreachable when a worker is revoked: its push is retried by
    the replica that revoked (``retry_step``, every 2 s), not only at the next renewal
    tick, and stops once the agent confirmed it."""
    side = coordinator.state.agents
    assert isinstance(side, AgentSide)
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    nodes = [agents.add(f"a{i}", price=f"0.{i + 1}") for i in range(3)]
    coordinator.run_coro(force_available(coordinator.state.sessions, [n.node_id for n in nodes]))
    client.create_cluster({"name": "r", "nodes": 3, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("r", timeout=30)
    assert cluster.state == "running", cluster.reason
    head = next(m for m in cluster.members if m.role == "head")
    lost = next(m for m in cluster.members if m.role == "worker")
    side.unreachable.add(head.node_id)
    coordinator.run_coro(revoke(coordinator.state, cluster.id, [lost.id]))
    overlay = current(coordinator.state)
    assert overlay is not None and (head.node_id, cluster.id) in overlay.retry
    assert head.node_id not in {n for n, _ in side.blocklists}
    side.unreachable.clear()  # the link is back: the loop delivers it within seconds
    deadline = time.time() + 15
    while time.time() < deadline and head.node_id not in {n for n, _ in side.blocklists}:
        time.sleep(0.2)
    got = [a for n, a in side.blocklists if n == head.node_id]
    assert got and got[-1]["fingerprints"] == coordinator.run_coro(
        overlay.book.blocklist(cluster.id)
    )
    assert (head.node_id, cluster.id) not in overlay.retry
    pushes = len(side.blocklists)
    time.sleep(2.5)  # nothing more to retry: no more pushes
    assert len(side.blocklists) == pushes


@nebula
def test_the_owner_revokes_a_user_certificate(
    coordinator: CoordinatorThread, client: LoomClient, agents: FakeAgents, tmp_path: Path
) -> None:
    side = coordinator.state.agents
    assert isinstance(side, AgentSide)
    client.request("POST", "/v1/credits/deposit", json={"amount": "1000"})
    node = agents.add("a0", price="0.1")
    coordinator.run_coro(force_available(coordinator.state.sessions, [node.node_id]))
    client.create_cluster({"name": "u", "nodes": 1, "resources": {"cpus": 1}})
    cluster = client.wait_cluster("u", timeout=30)
    assert cluster.state == "running", cluster.reason
    pub = generate_key(tmp_path / "user")
    raw = client.request("POST", f"/v1/clusters/{cluster.id}/overlay", json={"public_key": pub})
    grant = OverlayGrant.model_validate(raw.json())
    crt = tmp_path / "user.crt"
    crt.write_text(grant.crt)
    printed = subprocess.run(
        ["nebula-cert", "print", "-json", "-path", str(crt)], capture_output=True, text=True
    ).stdout
    name = json.loads(printed)["details"]["name"]
    gone = client.request("DELETE", f"/v1/clusters/u/overlay/{name}").json()
    assert gone == {"name": name, "fingerprints": [fingerprint(grant.crt)]}
    # The cluster's member was told; the lighthouse blocks it too.
    assert side.blocklists == [
        (node.node_id, {"cluster_id": cluster.id, "fingerprints": [fingerprint(grant.crt)]})
    ]
    overlay = current(coordinator.state)
    assert overlay is not None and overlay.lighthouse_list == (fingerprint(grant.crt),)
    # Twice, a member's id, or nonsense: a clear 404, nothing revoked.
    for bad in (name, cluster.members[0].id, "u-nothing"):
        with pytest.raises(LoomAPIError) as err:
            client.request("DELETE", f"/v1/clusters/u/overlay/{bad}")
        assert err.value.status == 404 and "user certificate" in err.value.message
    assert len(side.blocklists) == 1
