"""A renewed overlay certificate is the one Nebula uses (issue 10): real namespaces, real
Nebula, certificates that live 15 s.

Four members of one cluster on this host, each in its own namespace with its own Nebula
(the agent's code: :class:`loom.agent.overlay.MemberOverlay`, keys generated here), the
coordinator's CA and lighthouse. m1 and m2 are renewed before their first certificate
expires (the agent swaps the file, SIGHUP); m4 is not. Across the old certificates' expiry:

- a TCP connection m2 -> m1 keeps exchanging data, and new connections keep opening;
- a member that joins afterwards (m3) handshakes with m1: m1 presents the renewed
  certificate (an expired one is refused by the peer) ...
- ... while m3 cannot handshake with m4, whose certificate expired (the control).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom.agent.netns import MemberNet, NetnsManager, unavailable_reason
from loom.agent.overlay import MemberOverlay, generate_key
from support.overlay_book import standalone_overlay

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        unavailable_reason() is not None or shutil.which("nebula") is None,
        reason=f"needs root, iproute2, nftables and nebula ({unavailable_reason()})",
    ),
]

LIFETIME_S = 15.0
PORT = 7100

SERVER = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT)); s.listen(16); print("up", flush=True)
def serve(c):
    while True:
        data = c.recv(4096)
        if not data:
            return
        c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
""".replace("PORT", str(PORT))

#: One long-lived connection: a line each 0.2 s, echoed; prints the time of each echo.
STREAM = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], PORT), timeout=5)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    c.sendall(b"ping\\n")
    assert c.recv(16) == b"ping\\n"
    print(time.time(), flush=True)
    time.sleep(0.2)
""".replace("PORT", str(PORT))


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _in(net: MemberNet) -> list[str]:
    return ["nsenter", f"--net={net.path}", "--"]


def _connects(net: MemberNet, host: str, timeout: float = 3.0) -> bool:
    code = f"import socket; socket.create_connection(({host!r}, {PORT}), timeout={timeout})"
    done = subprocess.run([*_in(net), sys.executable, "-c", code], capture_output=True)
    return done.returncode == 0


async def _until(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):  # type: ignore[arg-type]
            return True
        await asyncio.sleep(0.3)
    return False


async def test_a_renewed_certificate_is_used_across_the_old_ones_expiry(tmp_path: Path) -> None:
    stack = contextlib.AsyncExitStack()
    standalone = await stack.enter_async_context(
        standalone_overlay(tmp_path, "10.251.7.0/24", cert_lifetime_s=LIFETIME_S)
    )
    book = standalone.book
    netns = NetnsManager(f"loom-r{secrets.token_hex(3)}")
    nets: dict[str, MemberNet] = {}
    overlays: dict[str, MemberOverlay] = {}
    procs: list[subprocess.Popen[bytes]] = []

    async def member(name: str) -> MemberOverlay:
        net = await asyncio.to_thread(netns.create, secrets.token_hex(5), "c1")
        nets[name] = net
        where = tmp_path / name / "nebula"
        public = await asyncio.to_thread(generate_key, where)  # the agent's own key
        grant = await book.grant("c1", name, None, public)
        overlay = MemberOverlay(grant, net, where, netns)
        overlays[name] = overlay
        await overlay.start()
        return overlay

    try:
        m1, m2, m4 = [await member(n) for n in ("m1", "m2", "m4")]
        first_expiry = min(o.grant.expires_at for o in (m1, m2, m4))
        for m in (m1, m4):
            server = _spawn([*_in(m.net), sys.executable, "-c", SERVER])
            procs.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == b"up"
        ip1, ip4 = m1.grant.overlay_ip, m4.grant.overlay_ip
        assert await _until(lambda: _connects(nets["m2"], ip1), 20), m2.log_tail()
        assert await _until(lambda: _connects(nets["m2"], ip4), 20), m2.log_tail()
        # The long-lived connection, until 6 s past the first certificates' expiry.
        stream = _spawn(
            [
                *_in(m2.net),
                sys.executable,
                "-c",
                STREAM,
                ip1,
                str(first_expiry + 6 - time.time()),
            ]
        )
        procs.append(stream)
        # The coordinator's renewal, driven here: m1 and m2 (not m4) when due.
        renewed: set[str] = set()
        while time.time() < first_expiry + 2:
            for name in await book.due(time.time()):
                if name in ("m1", "m2") and name not in renewed:
                    renewal = await book.renew(name, None, time.time())
                    assert renewal is not None
                    assert await overlays[name].renew(renewal.crt), overlays[name].log_tail()
                    await book.renewed(renewal, time.time())
                    renewed.add(name)
            await asyncio.sleep(0.2)
        assert renewed == {"m1", "m2"}
        entries = [await book.entry(n) for n in renewed]
        assert all(e is not None and e.expires > first_expiry + 5 for e in entries)
        # Past the old expiry: the old tunnel carries on, and new connections open.
        assert await asyncio.to_thread(_connects, nets["m2"], ip1)
        out, err = await asyncio.to_thread(stream.communicate, None, 30)
        assert stream.returncode == 0, err.decode()[-500:]
        echoes = [float(x) for x in out.split()]
        assert echoes and echoes[-1] > first_expiry + 3, (first_expiry, echoes[-3:])
        gaps = [b - a for a, b in itertools.pairwise(echoes)]
        assert max(gaps) < 2.0, max(gaps)  # never stalled across the reload or the expiry
        # A member joining now handshakes with m1 (renewed) but not with m4 (expired).
        m3 = await member("m3")
        assert await _until(lambda: _connects(nets["m3"], ip1), 20), m3.log_tail(10)
        assert not await _until(lambda: _connects(nets["m3"], ip4, 2.0), 8)
        refused = m3.log_path.read_text(errors="replace")
        assert "certificate is expired" in refused and "Name: m4" in refused, refused[-2000:]
        assert "Name: m1" not in refused.split("certificate is expired")[0][-600:]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for o in overlays.values():
            await o.stop()
        for net in nets.values():
            await asyncio.to_thread(netns.destroy, net)
        await stack.aclose()
