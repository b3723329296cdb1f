"""The overlay's CA, address book and certificate signing (``nebula-cert``)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loom.protocol.overlay import OverlayGrant

CA_NAME = "loom overlay"
CA_DURATION_H = 24 * 365 * 5
#: Certificates outlive the cluster's planned end by this much (renewed while it lives).
CERT_SLACK_S = 3600
#: The shortest certificate ever signed.
MIN_CERT_S = 600
LIGHTHOUSE_NAME = "lighthouse"
LIGHTHOUSE_GROUP = "loom-lighthouse"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class OverlayConfigError(ValueError):
    """The overlay options are wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class OverlaySettings:
    """``--overlay-listen``, ``--overlay-advertise``, ``--overlay-network``."""

    listen: str
    advertise: str
    network: str
    data_dir: Path

    @property
    def net(self) -> ipaddress.IPv4Network:
        try:
            net = ipaddress.IPv4Network(self.network, strict=True)
        except ValueError as exc:
            raise OverlayConfigError(
                f"--overlay-network {self.network!r}: {exc} (e.g. 10.250.0.0/16)"
            ) from None
        if not net.is_private or not 8 <= net.prefixlen <= 24:
            raise OverlayConfigError(
                f"--overlay-network {self.network} must be a private IPv4 range from /8 to /24"
            )
        return net

    @property
    def listen_port(self) -> int:
        return _split(self.listen, "--overlay-listen")[1]

    @property
    def listen_host(self) -> str:
        return _split(self.listen, "--overlay-listen")[0]

    def advertised(self) -> list[str]:
        """Where members send their UDP to reach the lighthouse (host:port, one or more)."""
        items = [a.strip() for a in (self.advertise or self.listen).split(",") if a.strip()]
        for item in items:
            _split(item, "--overlay-advertise")
        return items


def _split(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OverlayConfigError(f"{option} {value!r} must be HOST:PORT, e.g. 0.0.0.0:4242")
    return host.strip("[]"), int(port)


def nebula_cert() -> str:
    found = shutil.which("nebula-cert")
    if found is None:
        raise OverlayConfigError(
            "the overlay needs Nebula (`nebula-cert` not found): apt-get install nebula"
        )
    return found


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1]} failed: {done.stderr.strip() or done.stdout}")


class Authority:
    """The CA and the address book; thread-safe (signing runs in worker threads)."""

    def __init__(self, settings: OverlaySettings) -> None:
        self.settings = settings
        self.net = settings.net
        self.dir = settings.data_dir
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self.ca_crt_path = self.dir / "ca.crt"
        self.ca_key_path = self.dir / "ca.key"
        self._book_path = self.dir / "addresses.json"
        self._ensure_ca()
        self.ca_crt = self.ca_crt_path.read_text()
        #: member id -> [cluster id, overlay address]
        self._book: dict[str, list[str]] = self._load()

    @property
    def lighthouse_ip(self) -> str:
        return str(self.net.network_address + 1)

    def _ensure_ca(self) -> None:
        if self.ca_key_path.exists() and self.ca_crt_path.exists():
            os.chmod(self.ca_key_path, 0o600)
            return
        for p in (self.ca_key_path, self.ca_crt_path):
            p.unlink(missing_ok=True)
        _run(
            [
                nebula_cert(),
                "ca",
                "-name",
                CA_NAME,
                "-duration",
                f"{CA_DURATION_H}h",
                "-out-crt",
                str(self.ca_crt_path),
                "-out-key",
                str(self.ca_key_path),
            ]
        )
        os.chmod(self.ca_key_path, 0o600)

    def _load(self) -> dict[str, list[str]]:
        try:
            raw = json.loads(self._book_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): [str(v[0]), str(v[1])] for k, v in raw.items() if len(v) == 2}

    def _save(self) -> None:
        tmp = self._book_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._book, sort_keys=True))
        tmp.replace(self._book_path)

    def address_of(self, member_id: str) -> str | None:
        with self._lock:
            entry = self._book.get(member_id)
        return entry[1] if entry else None

    def allocate(self, cluster_id: str, member_id: str) -> str:
        """The member's overlay address (the same one on every call)."""
        with self._lock:
            entry = self._book.get(member_id)
            if entry is not None:
                return entry[1]
            used = {v[1] for v in self._book.values()}
            first = int(self.net.network_address) + 2  # .1 is the lighthouse
            last = int(self.net.broadcast_address) - 1
            for value in range(first, last + 1):
                ip = str(ipaddress.IPv4Address(value))
                if ip not in used:
                    self._book[member_id] = [cluster_id, ip]
                    self._save()
                    return ip
        raise RuntimeError(f"the overlay network {self.net} is full: choose a larger one")

    def release_cluster(self, cluster_id: str) -> list[str]:
        """Free the addresses of a cluster's members; returns those member ids."""
        with self._lock:
            gone = [m for m, v in self._book.items() if v[0] == cluster_id]
            for m in gone:
                del self._book[m]
            if gone:
                self._save()
        return gone

    def sign(self, name: str, ip: str, groups: list[str], duration_s: float) -> tuple[str, str]:
        """(certificate, private key) PEM for ``name`` at ``ip`` in ``groups``."""
        for g in [name, *groups]:
            if not _SAFE.match(g):
                raise ValueError(f"bad certificate name or group {g!r}")
        seconds = max(MIN_CERT_S, int(duration_s))
        with tempfile.TemporaryDirectory(prefix="loom-cert-") as tmp:
            crt, key = Path(tmp) / "m.crt", Path(tmp) / "m.key"
            argv = [
                nebula_cert(),
                "sign",
                "-ca-crt",
                str(self.ca_crt_path),
                "-ca-key",
                str(self.ca_key_path),
                "-name",
                name,
                "-ip",
                f"{ip}/{self.net.prefixlen}",
                "-duration",
                f"{seconds}s",
                "-out-crt",
                str(crt),
                "-out-key",
                str(key),
            ]
            if groups:
                argv += ["-groups", ",".join(groups)]
            _run(argv)
            return crt.read_text(), key.read_text()

    def grant(
        self, cluster_id: str, member_id: str, ends_at: float | None, now: float | None = None
    ) -> OverlayGrant:
        """A member's certificate and how to reach the lighthouse."""
        now = time.time() if now is None else now
        ip = self.allocate(cluster_id, member_id)
        lifetime = (ends_at - now if ends_at else 24 * 3600) + CERT_SLACK_S
        crt, key = self.sign(member_id, ip, [cluster_group(cluster_id)], lifetime)
        return OverlayGrant(
            ca_crt=self.ca_crt,
            crt=crt,
            key=key,
            overlay_ip=ip,
            prefix_len=self.net.prefixlen,
            group=cluster_group(cluster_id),
            lighthouse_ip=self.lighthouse_ip,
            lighthouse_addresses=self.settings.advertised(),
            expires_at=now + max(MIN_CERT_S, lifetime),
        )

    def lighthouse_files(self) -> tuple[Path, Path]:
        """The lighthouse's own certificate and key (signed once, renewed when near expiry)."""
        crt, key = self.dir / "lighthouse.crt", self.dir / "lighthouse.key"
        stamp = self.dir / "lighthouse.expires"
        with contextlib.suppress(OSError, ValueError):
            if crt.exists() and key.exists() and float(stamp.read_text()) > time.time() + 86400:
                return crt, key
        lifetime = 365 * 86400
        pem, secret = self.sign(LIGHTHOUSE_NAME, self.lighthouse_ip, [LIGHTHOUSE_GROUP], lifetime)
        crt.write_text(pem)
        key.touch(mode=0o600)
        key.write_text(secret)
        stamp.write_text(str(time.time() + lifetime))
        return crt, key


def cluster_group(cluster_id: str) -> str:
    """The Nebula group of a cluster's members (and of its users' certificates)."""
    return cluster_id
