"""The overlay's CA and certificate signing (``nebula-cert``), and its settings."""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CA_NAME = "loom overlay"
CA_DURATION_H = 24 * 365 * 5
#: Member certificates live this long by default (``--overlay-cert-lifetime``), or until
#: the cluster's planned end plus :data:`CERT_SLACK_S` if that is sooner.
CERT_LIFETIME_S = 4 * 3600.0
CERT_SLACK_S = 300
#: The shortest certificate signed (unless the configured lifetime is shorter: tests).
MIN_CERT_S = 600
#: A certificate is renewed once less than this share of its lifetime is left.
RENEW_AT = 1 / 3
LIGHTHOUSE_NAME = "lighthouse"
#: Overlay addresses reserved for lighthouses (one per replica that runs one): the
#: network's first addresses; members' start after them.
LIGHTHOUSE_SLOTS = 8
LIGHTHOUSE_GROUP = "loom-lighthouse"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def fingerprint(crt_pem: str) -> str:
    """The certificate's fingerprint as Nebula computes it (``nebula-cert print``'s
    ``fingerprint``, what ``pki.blocklist`` lists): hex SHA-256 of the PEM's body."""
    lines = [ln.strip() for ln in crt_pem.strip().splitlines()]
    if len(lines) < 3 or not lines[0].startswith("-----BEGIN NEBULA CERTIFICATE"):
        raise ValueError("not a Nebula certificate PEM")
    try:
        raw = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a Nebula certificate PEM (bad base64)") from None
    return hashlib.sha256(raw).hexdigest()


class OverlayConfigError(ValueError):
    """The overlay options are wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class OverlaySettings:
    """``--overlay-listen``, ``--overlay-advertise``, ``--overlay-network``."""

    listen: str
    advertise: str
    network: str
    data_dir: Path
    #: ``--overlay-cert-lifetime`` (seconds).
    cert_lifetime_s: float = CERT_LIFETIME_S

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
    """The CA (files in the overlay directory) and certificate signing; thread-safe.

    The address book, the signed certificates and the blocklist live in the database
    (:mod:`loom.coordinator.overlay.book`), shared by every replica. Every replica signs
    with the same CA: the operator gives each the same ``ca.crt`` and ``ca.key`` (the
    first replica creates them; the database records the CA certificate, and a replica
    holding a different one refuses to start).
    """

    def __init__(self, settings: OverlaySettings, *, create: bool = True) -> None:
        self.settings = settings
        self.net = settings.net
        self.dir = settings.data_dir
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self.ca_crt_path = self.dir / "ca.crt"
        self.ca_key_path = self.dir / "ca.key"
        self._ensure_ca(create)
        self.ca_crt = self.ca_crt_path.read_text()

    @property
    def first_member_address(self) -> ipaddress.IPv4Address:
        """Members' addresses start after the lighthouses' reserved slots."""
        return self.net.network_address + 1 + LIGHTHOUSE_SLOTS

    def lighthouse_ip(self, slot: int) -> str:
        """The overlay address of lighthouse ``slot`` (0 .. LIGHTHOUSE_SLOTS - 1)."""
        if not 0 <= slot < LIGHTHOUSE_SLOTS:
            raise ValueError(f"lighthouse slot {slot} out of range")
        return str(self.net.network_address + 1 + slot)

    def has_ca(self) -> bool:
        return self.ca_key_path.exists() and self.ca_crt_path.exists()

    def _ensure_ca(self, create: bool) -> None:
        # Replicas sharing one directory (``loom up --replicas``) start at once: one creates.
        with open(self.dir / ".ca.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.has_ca():
                os.chmod(self.ca_key_path, 0o600)
                return
            if not create:
                raise OverlayConfigError(f"no overlay CA in {self.dir} (ca.crt and ca.key)")
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

    def sign(
        self,
        name: str,
        ip: str,
        groups: list[str],
        duration_s: float,
        public_key: str | None = None,
    ) -> tuple[str, str]:
        """(certificate, private key) PEM for ``name`` at ``ip`` in ``groups``.

        With ``public_key`` (a member's or user's, generated where it is used) only the
        certificate is made and the key is "": the private key never passes here.
        """
        for g in [name, *groups]:
            if not _SAFE.match(g):
                raise ValueError(f"bad certificate name or group {g!r}")
        seconds = max(1, int(duration_s))
        with tempfile.TemporaryDirectory(prefix="loom-cert-") as tmp:
            crt, key, pub = Path(tmp) / "m.crt", Path(tmp) / "m.key", Path(tmp) / "m.pub"
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
            ]
            if public_key is not None:
                pub.write_text(public_key)
                argv += ["-in-pub", str(pub)]
            else:
                argv += ["-out-key", str(key)]
            if groups:
                argv += ["-groups", ",".join(groups)]
            _run(argv)
            return crt.read_text(), "" if public_key is not None else key.read_text()

    def lifetime(self, ends_at: float | None, now: float) -> float:
        """A new certificate's lifetime: the configured one, or the cluster's rest if sooner."""
        configured = self.settings.cert_lifetime_s
        if ends_at:
            configured = min(configured, ends_at - now + CERT_SLACK_S)
        return max(min(MIN_CERT_S, self.settings.cert_lifetime_s), configured)

    def lighthouse_dir(self, slot: int) -> Path:
        """Lighthouse ``slot``'s own files (replicas sharing the directory each have one)."""
        path = self.dir / f"lighthouse-{slot}"
        path.mkdir(exist_ok=True, mode=0o700)
        return path

    def lighthouse_files(self, slot: int) -> tuple[Path, Path]:
        """Lighthouse ``slot``'s certificate and key (signed once, renewed near expiry)."""
        home = self.lighthouse_dir(slot)
        crt, key, stamp = home / "host.crt", home / "host.key", home / "expires"
        ip = self.lighthouse_ip(slot)
        with contextlib.suppress(OSError, ValueError):
            until, _, signed_ip = stamp.read_text().partition(" ")
            fresh = float(until) > time.time() + 86400 and signed_ip == ip
            if fresh and crt.exists() and key.exists():
                return crt, key
        lifetime = 365 * 86400
        pem, secret = self.sign(f"{LIGHTHOUSE_NAME}-{slot}", ip, [LIGHTHOUSE_GROUP], lifetime)
        crt.write_text(pem)
        key.touch(mode=0o600)
        key.write_text(secret)
        stamp.write_text(f"{time.time() + lifetime} {ip}")
        return crt, key


def cluster_group(cluster_id: str) -> str:
    """The Nebula group of a cluster's members (and of its users' certificates)."""
    return cluster_id
