"""The lighthouse + relay: one Nebula process, supervised (restarted when it dies).

It needs no tun device (``tun.disabled``) and so no privileges: it only answers where
each member can be reached, and relays for members that cannot reach each other directly
(symmetric NAT). It joins no cluster's group, so it can reach no member's Ray ports.
Its ``pki.blocklist`` holds every revoked certificate (:meth:`Lighthouse.reload` rewrites
it and sends SIGHUP): a revoked member gets no answer and no relay from it.

With replicas, each replica running the overlay runs its own lighthouse in its own slot
(an overlay address reserved for lighthouses, :meth:`Authority.lighthouse_ip`); members
report to all of them and may be relayed by any.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
from pathlib import Path

from loom.coordinator.overlay.authority import Authority, OverlayConfigError
from loom.protocol.overlay import SOCKET_BUFFER

log = logging.getLogger(__name__)

#: Restarts back off up to this many seconds after repeated quick deaths.
MAX_BACKOFF_S = 10.0
#: How long the lighthouse may take to log that it reloaded its CA pool (and blocklist).
RELOAD_TIMEOUT_S = 10.0
_CA_RELOADED = b"Trusted CA certificates refreshed"


def nebula_binary() -> str:
    found = shutil.which("nebula")
    if found is None:
        raise OverlayConfigError(
            "the overlay needs Nebula (`nebula` not found): apt-get install nebula"
        )
    return found


def _dies_with_parent() -> list[str]:
    """A prefix that makes the lighthouse get SIGTERM when its coordinator dies, even by
    SIGKILL (``setpriv --pdeathsig``): an orphan would keep the UDP port, and the
    restarted coordinator's own lighthouse could not bind it."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def lighthouse_config(
    authority: Authority, crt: Path, key: Path, blocklist: list[str]
) -> dict[str, object]:
    settings = authority.settings
    return {
        "pki": {
            "ca": str(authority.ca_crt_path),
            "cert": str(crt),
            "key": str(key),
            # Every cluster's revoked certificates: no lighthouse answers, no relay.
            "blocklist": list(blocklist),
            "disconnect_invalid": True,
        },
        "static_host_map": {},
        "lighthouse": {"am_lighthouse": True, "interval": 60},
        # The relay's socket buffers, as a member's (bench/overlay.py: a relay that drops
        # nothing is 1.2-1.3x faster):
        # SO_RCVBUFFORCE needs CAP_NET_ADMIN; without it Nebula logs an error and keeps
        # the system's default.
        "listen": {
            "host": settings.listen_host,
            "port": settings.listen_port,
            "read_buffer": SOCKET_BUFFER,
            "write_buffer": SOCKET_BUFFER,
        },
        "punchy": {"punch": True, "respond": True},
        "relay": {"am_relay": True, "use_relays": False},
        "tun": {"disabled": True},
        "logging": {"level": "info", "format": "text"},
        # Nothing reaches the lighthouse itself; relayed traffic is not filtered here
        # (each member's own firewall admits only its cluster's group).
        "firewall": {"outbound": [{"port": "any", "proto": "any", "host": "any"}], "inbound": []},
    }


class Lighthouse:
    """``await start()`` once; ``run()`` is the supervisor task; ``stop()`` ends it."""

    def __init__(self, authority: Authority, slot: int = 0) -> None:
        self.authority = authority
        self.slot = slot
        self.ip = authority.lighthouse_ip(slot)
        home = authority.lighthouse_dir(slot)
        self.config_path = home / "lighthouse.yml"
        self.log_path = home / "lighthouse.log"
        #: The network's blocklist as last written into the config (see :meth:`reload`).
        self.blocklist: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        #: One rewrite + SIGHUP at a time (the revoking request and the replica's check
        #: may both reload; each waits for its own confirmation in the log).
        self._reload_lock = asyncio.Lock()

    def _write_config(self) -> None:
        crt, key = self.authority.lighthouse_files(self.slot)
        config = lighthouse_config(self.authority, crt, key, self.blocklist)
        # JSON is YAML: no YAML writer needed.
        tmp = self.config_path.with_suffix(".new")
        tmp.write_text(json.dumps(config))
        tmp.replace(self.config_path)

    async def reload(
        self, blocklist: list[str] | None = None, timeout: float = RELOAD_TIMEOUT_S
    ) -> bool:
        """Rewrite the config (with ``blocklist``, the network's whole list, if given) and
        SIGHUP; whether Nebula took it. A lighthouse that is (re)starting reads the new
        config when it comes up."""
        async with self._reload_lock:
            if blocklist is not None:
                self.blocklist = list(blocklist)
            await asyncio.to_thread(self._write_config)
            proc = self.proc
            if proc is None or proc.returncode is not None:
                return False
            size = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc.send_signal(signal.SIGHUP)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                if _CA_RELOADED in await asyncio.to_thread(self._log_since, size):
                    return True
                await asyncio.sleep(0.05)
            log.warning("the lighthouse did not confirm the reload: %s", self.log_tail(3))
            return False

    def _log_since(self, offset: int) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    async def _spawn(self) -> asyncio.subprocess.Process:
        self._write_config()
        out = open(self.log_path, "ab")  # noqa: SIM115, ASYNC230 - handed to the child
        try:
            return await asyncio.create_subprocess_exec(
                *_dies_with_parent(),
                nebula_binary(),
                "-config",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            out.close()

    async def start(self) -> None:
        self.proc = await self._spawn()
        await asyncio.sleep(0.2)
        if self.proc.returncode is not None:
            raise OverlayConfigError(
                f"the Nebula lighthouse exited at once (code {self.proc.returncode}); "
                f"see {self.log_path}: {self.log_tail()}"
            )
        log.info(
            "overlay lighthouse on udp %s (overlay %s, advertised %s)",
            self.authority.settings.listen,
            self.ip,
            ",".join(self.authority.settings.advertised()),
        )

    async def run(self) -> None:
        """Supervise: restart the lighthouse whenever it exits, until cancelled."""
        backoff = 0.5
        try:
            while True:
                proc = self.proc
                if proc is None:
                    proc = self.proc = await self._spawn()
                code = await proc.wait()
                if self._stopping:
                    return
                log.warning("overlay lighthouse exited (code %s); restarting", code)
                self.restarts += 1
                self.proc = None
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
        finally:
            await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
