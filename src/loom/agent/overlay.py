"""A member's own Nebula: the cluster's overlay, inside the member's network namespace.

The member's keypair is generated here (:func:`generate_key`, ``nebula-cert keygen``, key
0600 in the member's directory, hidden from the sandbox) when the coordinator asks for the
public key; the private key never leaves this machine. The coordinator's grant
(:class:`loom.protocol.overlay.OverlayGrant`) then carries the member's certificate for
that key (groups = its cluster) and where the lighthouse is. This module writes the
member's Nebula files, runs ``nebula`` inside the member's namespace (its tun device lives
and dies there), and configures a firewall that admits only the cluster's group: another
cluster's member cannot open anything here, even on the same host, and the lighthouse
(which joins no cluster) cannot either. A renewed certificate (:meth:`MemberOverlay.renew`)
replaces the file and Nebula gets SIGHUP: it reloads its PKI and keeps its tunnels. The
cluster's revoked certificates (:meth:`MemberOverlay.block`, ``member.overlay_blocklist``)
go into ``pki.blocklist`` the same way; with ``pki.disconnect_invalid`` Nebula also closes
a tunnel already open with a revoked certificate.

The Ray node then binds the overlay address. The host reaches that address through a
/32 route via the member's veth (the agent's tunnel to the head's Ray client port).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from loom.agent.netns import MemberNet, NetnsError, NetnsManager, host_addresses
from loom.protocol.overlay import PUNCH_DELAY, SOCKET_BUFFER, OverlayGrant

log = logging.getLogger(__name__)

#: The UDP port of every member's Nebula (each member has its own namespace).
NEBULA_PORT = 4242
TUN_DEVICE = "nebula1"
#: Nebula's default, safe on any internet path (1300 + 60 bytes of Nebula, UDP and IPv4),
#: PPPoE's and a relay's extra header included. 1440 (1500 outside) was 10-20 % faster on a
#: direct path in bench/overlay.py but fragments through the relay (docs/overlay.md).
TUN_MTU = 1300
START_TIMEOUT_S = 10.0
#: How often a member's Nebula log is read for relayed tunnels.
RELAY_POLL_S = 2.0
#: How long a SIGHUPed Nebula may take to say it reloaded its certificate.
RELOAD_TIMEOUT_S = 10.0
_RELOADED = b"Client cert refreshed from disk"
#: Logged on every reload: the CA pool, and with it ``pki.blocklist``, was read again.
_CA_RELOADED = b"Trusted CA certificates refreshed"
KEY_FILE = "host.key"
PUB_FILE = "host.pub"
_HANDSHAKE = re.compile(
    r'msg="Handshake message received".*? initiatorIndex=([0-9]+).*?'
    r'udpAddr="?([^" ]+)"? vpnIp=([0-9.]+)'
)
#: A relayed tunnel that got a packet straight from the peer moves to that address.
_ROAMED = re.compile(r'msg="Host roamed to new udp ip/port\.".*? vpnIp=([0-9.]+)')

ReportFn = Callable[[str, dict[str, Any]], Awaitable[None]]


class OverlayError(RuntimeError):
    """A member's Nebula could not start; the message says why."""


def nebula_binary() -> str | None:
    return shutil.which("nebula")


def generate_key(directory: Path) -> str:
    """The member's Nebula public key PEM; generates the keypair the first time.

    The private key is written 0600 into ``directory`` (made 0700) and never read back
    by anything but this machine's Nebula. Repeated calls return the same public key.
    """
    key, pub = directory / KEY_FILE, directory / PUB_FILE
    if key.exists() and pub.exists():
        return pub.read_text()
    tool = shutil.which("nebula-cert")
    if tool is None:
        raise OverlayError(
            "the overlay needs Nebula (`nebula-cert` not found): apt-get install nebula"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    with tempfile.TemporaryDirectory(prefix=".keygen-", dir=directory) as tmp:
        new_key, new_pub = Path(tmp) / KEY_FILE, Path(tmp) / PUB_FILE
        done = subprocess.run(
            [tool, "keygen", "-out-key", str(new_key), "-out-pub", str(new_pub)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise OverlayError(f"nebula-cert keygen failed: {done.stderr.strip()}")
        os.chmod(new_key, 0o600)
        new_key.replace(key)
        new_pub.replace(pub)
    return pub.read_text()


def lighthouse_hosts(grant: OverlayGrant, net: MemberNet) -> tuple[dict[str, list[str]], set[int]]:
    """Where this member sends UDP for each lighthouse, and which of those ports are local.

    A lighthouse on this very machine is reached through the member's veth: on loopback
    (``loom up``) at the veth's host side; on one of the host's own addresses at that
    address (the lighthouse may listen on it only). Either way the host's input chain
    admits the member's UDP to that port (``host_udp``).
    """
    local = host_addresses()
    found: dict[str, list[str]] = {}
    ports: set[int] = set()
    for lighthouse_ip, addresses in grant.lighthouses().items():
        out = found.setdefault(lighthouse_ip, [])
        for item in addresses:
            host, _, port = item.rpartition(":")
            host = host.strip("[]")
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                out.append(item)  # a DNS name: resolved by Nebula inside the namespace
                continue
            if ip.is_loopback or ip.is_unspecified:
                out.append(f"{net.host_ip}:{port}")
                ports.add(int(port))
            elif str(ip) in local:
                out.append(f"{ip}:{port}")
                ports.add(int(port))
            else:
                out.append(f"{ip}:{port}")
    return found, ports


def member_config(
    grant: OverlayGrant, net: MemberNet, directory: Path, blocklist: list[str] | None = None
) -> dict[str, object]:
    hosts, _ = lighthouse_hosts(grant, net)
    return {
        "pki": {
            "ca": str(directory / "ca.crt"),
            "cert": str(directory / "host.crt"),
            "key": str(directory / KEY_FILE),
            # Revoked certificates (removed members, dropped users) of this cluster, and
            # tunnels already open with one are closed at Nebula's next check.
            "blocklist": list(grant.blocklist if blocklist is None else blocklist),
            "disconnect_invalid": True,
        },
        "static_host_map": hosts,
        "lighthouse": {"am_lighthouse": False, "interval": 30, "hosts": list(hosts)},
        "listen": {
            "host": "0.0.0.0",
            "port": NEBULA_PORT,
            "read_buffer": SOCKET_BUFFER,
            "write_buffer": SOCKET_BUFFER,
        },
        "punchy": {"punch": True, "respond": True, "delay": PUNCH_DELAY},
        "relay": {"relays": list(hosts), "am_relay": False, "use_relays": True},
        "tun": {"dev": TUN_DEVICE, "mtu": TUN_MTU, "drop_local_broadcast": True},
        "logging": {"level": "info", "format": "text"},
        "handshakes": {"try_interval": "100ms", "retries": 20},
        "firewall": {
            "conntrack": {"tcp_timeout": "12m", "udp_timeout": "3m", "default_timeout": "10m"},
            "outbound": [{"port": "any", "proto": "any", "host": "any"}],
            # Only the cluster's own members (and its users' certificates).
            "inbound": [{"port": "any", "proto": "any", "group": grant.group}],
        },
    }


class MemberOverlay:
    """One member's Nebula process: ``await start()``, ``await stop()`` (idempotent)."""

    def __init__(
        self, grant: OverlayGrant, net: MemberNet, directory: Path, netns: NetnsManager
    ) -> None:
        self.grant = grant
        self.net = net
        self.dir = directory
        self.netns = netns
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = directory / "nebula.log"
        #: Overlay address of each peer -> whether its tunnel runs through the relay.
        self.peers: dict[str, bool] = {}
        #: Overlay address of each peer -> the handshake (initiator index) of its tunnel.
        self._handshakes: dict[str, str] = {}
        self._log_offset = 0
        self._watch: asyncio.Task[None] | None = None
        #: Seconds each step took: "nebula" (start to tun up), "reach_head" (worker only).
        self.timings: dict[str, float] = {}
        #: The fingerprints in ``pki.blocklist`` (the grant's, then each update's).
        self.blocklist: list[str] = list(grant.blocklist)

    def _write_files(self) -> Path:
        if not (self.dir / KEY_FILE).exists():
            raise OverlayError(
                "no key for this member here (the agent restarted since member.overlay_key?)"
            )
        (self.dir / "ca.crt").write_text(self.grant.ca_crt)
        (self.dir / "host.crt").write_text(self.grant.crt)
        return self._write_config()

    def _write_config(self) -> Path:
        config = self.dir / "config.yml"
        body = json.dumps(member_config(self.grant, self.net, self.dir, self.blocklist))
        tmp = config.with_suffix(".new")
        tmp.write_text(body)  # JSON ⊂ YAML
        tmp.replace(config)
        return config

    async def start(self, timeout: float = START_TIMEOUT_S) -> None:
        nebula = nebula_binary()
        if nebula is None:
            raise OverlayError(
                "the overlay needs Nebula (`nebula` not found): apt-get install nebula"
            )
        try:
            config = await asyncio.to_thread(self._write_files)
        except OSError as exc:
            raise OverlayError(f"writing the member's Nebula files: {exc}") from None
        _, local_ports = lighthouse_hosts(self.grant, self.net)
        try:
            await asyncio.to_thread(self.netns.allow_overlay, self.net, NEBULA_PORT, local_ports)
        except NetnsError as exc:
            raise OverlayError(str(exc)) from None
        out = open(self.log_path, "ab")  # noqa: SIM115, ASYNC230 - handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                "nsenter",
                f"--net={self.net.path}",
                "--",
                nebula,
                "-config",
                str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            out.close()
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + timeout
        while not await asyncio.to_thread(self._tun_ready):
            if self.proc.returncode is not None or loop.time() > deadline:
                tail = self.log_tail()
                await self.stop()
                raise OverlayError(f"Nebula of the member did not come up: {tail}")
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._route_from_host)
        self.timings["nebula"] = loop.time() - began

    async def wait_reachable(self, address: str, timeout: float = 45.0) -> None:
        """Wait until ``host:port`` (the head's GCS) accepts TCP over the overlay.

        The first packets set up the tunnel: the lighthouse query, hole punching, or the
        relay behind a symmetric NAT. Ray gives up on an unreachable head after ~30 s, so
        the worker's Ray starts only once the path is there.
        """
        host, _, port = address.rpartition(":")
        probe = [
            "nsenter",
            f"--net={self.net.path}",
            "--",
            "timeout",
            "3",
            "bash",
            "-c",
            f"exec 3<>/dev/tcp/{host}/{int(port)}",
        ]
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + timeout
        while True:
            proc = await asyncio.create_subprocess_exec(
                *probe,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await proc.wait() == 0:
                self.timings["reach_head"] = loop.time() - began
                return
            if loop.time() > deadline:
                raise OverlayError(
                    f"the head at {address} is not reachable over the overlay after "
                    f"{timeout:g} s: {self.log_tail(3)}"
                )
            await asyncio.sleep(0.3)

    async def renew(self, crt: str, timeout: float = RELOAD_TIMEOUT_S) -> bool:
        """Swap in a renewed certificate and make Nebula reload it (SIGHUP).

        Returns whether Nebula logged the reload within ``timeout``. Tunnels stay up: Nebula
        reloads its PKI in place; new handshakes present the new certificate.
        """
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return False
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        crt_path = self.dir / "host.crt"
        tmp = crt_path.with_suffix(".new")
        await asyncio.to_thread(tmp.write_text, crt)
        await asyncio.to_thread(tmp.replace, crt_path)
        if await self._reload(proc, size, _RELOADED, timeout):
            self.grant = self.grant.model_copy(update={"crt": crt})
            return True
        log.warning("member Nebula did not confirm the certificate reload: %s", self.log_tail(3))
        return False

    async def block(self, fingerprints: list[str], timeout: float = RELOAD_TIMEOUT_S) -> bool:
        """Make ``fingerprints`` the member's ``pki.blocklist`` and have Nebula reload it.

        Returns whether Nebula logged the reload within ``timeout`` (False too when it is
        not running yet: :meth:`start` writes the list it is given here).
        """
        self.blocklist = sorted(set(fingerprints))
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return False
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            await asyncio.to_thread(self._write_config)
        except OSError as exc:
            log.warning("writing the member's blocklist failed: %s", exc)
            return False
        if await self._reload(proc, size, _CA_RELOADED, timeout):
            return True
        log.warning("member Nebula did not confirm the blocklist reload: %s", self.log_tail(3))
        return False

    async def _reload(
        self, proc: asyncio.subprocess.Process, size: int, marker: bytes, timeout: float
    ) -> bool:
        """SIGHUP Nebula; whether it logged ``marker`` (after ``size``) within ``timeout``."""
        proc.send_signal(signal.SIGHUP)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if marker in await asyncio.to_thread(self._log_since, size):
                return True
            await asyncio.sleep(0.05)
        return False

    def _log_since(self, offset: int) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    def _tun_ready(self) -> bool:
        done = subprocess.run(
            ["ip", "-n", self.net.name, "-j", "-4", "addr", "show", "dev", TUN_DEVICE],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0 and f'"{self.grant.overlay_ip}"' in done.stdout

    def _route_from_host(self) -> None:
        """The host (agent) reaches the member's overlay address through its veth."""
        subprocess.run(
            ["ip", "route", "replace", f"{self.grant.overlay_ip}/32", "via", self.net.ns_ip],
            capture_output=True,
            timeout=10,
            check=True,
        )

    def read_tunnels(self) -> dict[str, bool]:
        """Update :attr:`peers` from the new lines of Nebula's log (handshakes completed).

        Nebula logs each handshake message it receives with the peer's UDP address, or
        ``<nil>`` when it came through a relay. The same handshake (initiator index) often
        arrives both ways, the relay's copy second: Nebula keeps the direct address then,
        and takes a direct copy that comes after a relayed one, so within one handshake
        direct wins. A new handshake replaces the tunnel; a relayed tunnel that hears from
        the peer directly roams to it. The lighthouse itself is not a peer.
        """
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                chunk = f.read()
        except OSError:
            return self.peers
        end = chunk.rfind(b"\n") + 1
        self._log_offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            found = _HANDSHAKE.search(line)
            if found:
                index, addr, peer = found.groups()
                if peer in self.grant.lighthouses():
                    continue
                relayed = addr == "<nil>"
                if self._handshakes.get(peer) == index:
                    relayed = relayed and self.peers.get(peer, True)
                self._handshakes[peer] = index
                self.peers[peer] = relayed
            elif (roamed := _ROAMED.search(line)) and roamed.group(1) in self.peers:
                self.peers[roamed.group(1)] = False
        return self.peers

    @property
    def relayed(self) -> bool:
        """All of this member's tunnels go through the relay (its NAT let none be punched).
        A member with a direct tunnel to some peer is not: only its tunnels to a relayed
        peer are, and that peer reports itself relayed."""
        return bool(self.peers) and all(self.peers.values())

    def watch(self, report: ReportFn, member_id: str) -> None:
        """Report ``member.overlay`` {member_id, relayed, peers} whenever it changes."""

        async def loop() -> None:
            last: tuple[bool, int] | None = None
            while True:
                await asyncio.to_thread(self.read_tunnels)
                now = (self.relayed, len(self.peers))
                if now != last:
                    last = now
                    with contextlib.suppress(Exception):
                        await report(
                            "member.overlay",
                            {"member_id": member_id, "relayed": now[0], "peers": dict(self.peers)},
                        )
                await asyncio.sleep(RELAY_POLL_S)

        if self._watch is None:
            self._watch = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await asyncio.to_thread(shutil.rmtree, self.dir, True)

    def log_tail(self, lines: int = 6) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
