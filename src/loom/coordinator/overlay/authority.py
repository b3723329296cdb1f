"""The overlay's CA, address book and certificate signing (``nebula-cert``)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loom.protocol.overlay import OverlayGrant, OverlayRenewal

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
LIGHTHOUSE_GROUP = "loom-lighthouse"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Entry:
    """One certificate holder: its cluster, address, public key and current certificate."""

    cluster: str
    ip: str
    #: The holder's public key PEM ("" until a certificate was signed for it).
    pub: str = ""
    expires: float = 0.0
    lifetime: float = 0.0
    #: Every certificate signed for it: (fingerprint, expiry). The holder keeps them all
    #: (a renewal does not void the previous one), so a revocation blocks them all.
    certs: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Revoked:
    """A blocked certificate: whose it was, and until when it needs blocking."""

    cluster: str
    holder: str
    expires: float
    #: Its overlay address: not given to anyone else before the certificate expires (a
    #: peer's tunnel to the revoked holder may outlive the revocation for a few seconds).
    ip: str = ""


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
        self._revoked_path = self.dir / "blocklist.json"
        self._ensure_ca()
        self.ca_crt = self.ca_crt_path.read_text()
        #: member id (or user certificate name) -> its entry
        self._book: dict[str, Entry] = self._load()
        #: fingerprint -> the revoked certificate (kept until it expires)
        self._revoked: dict[str, Revoked] = self._load_revoked()

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

    def _load(self) -> dict[str, Entry]:
        try:
            raw = json.loads(self._book_path.read_text())
        except (OSError, ValueError):
            return {}
        book: dict[str, Entry] = {}
        for k, v in raw.items():
            if isinstance(v, list) and len(v) == 2:  # written before keys were the agents'
                book[str(k)] = Entry(str(v[0]), str(v[1]))
            elif isinstance(v, dict) and {"cluster", "ip"} <= v.keys():
                book[str(k)] = Entry(
                    str(v["cluster"]),
                    str(v["ip"]),
                    str(v.get("pub", "")),
                    float(v.get("expires", 0.0)),
                    float(v.get("lifetime", 0.0)),
                    tuple((str(f), float(e)) for f, e in v.get("certs", ())),
                )
        return book

    def _load_revoked(self) -> dict[str, Revoked]:
        try:
            raw = json.loads(self._revoked_path.read_text())
        except (OSError, ValueError):
            return {}
        return {
            str(fp): Revoked(
                str(v["cluster"]), str(v["holder"]), float(v["expires"]), str(v.get("ip", ""))
            )
            for fp, v in raw.items()
            if isinstance(v, dict) and {"cluster", "holder", "expires"} <= v.keys()
        }

    def _save(self) -> None:
        tmp = self._book_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in self._book.items()}, sort_keys=True))
        tmp.replace(self._book_path)

    def _save_revoked(self) -> None:
        tmp = self._revoked_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in self._revoked.items()}, sort_keys=True))
        tmp.replace(self._revoked_path)

    def address_of(self, member_id: str) -> str | None:
        with self._lock:
            entry = self._book.get(member_id)
        return entry.ip if entry else None

    def entry(self, member_id: str) -> Entry | None:
        with self._lock:
            return self._book.get(member_id)

    def allocate(self, cluster_id: str, member_id: str) -> str:
        """The member's overlay address (the same one on every call)."""
        with self._lock:
            entry = self._book.get(member_id)
            if entry is not None:
                return entry.ip
            used = {v.ip for v in self._book.values()}
            now = time.time()
            used |= {r.ip for r in self._revoked.values() if r.expires > now}
            first = int(self.net.network_address) + 2  # .1 is the lighthouse
            last = int(self.net.broadcast_address) - 1
            for value in range(first, last + 1):
                ip = str(ipaddress.IPv4Address(value))
                if ip not in used:
                    self._book[member_id] = Entry(cluster_id, ip)
                    self._save()
                    return ip
        raise RuntimeError(f"the overlay network {self.net} is full: choose a larger one")

    def holders(self, cluster_id: str) -> list[str]:
        """The member ids (and user certificate names) holding an address in the cluster."""
        with self._lock:
            return sorted(m for m, v in self._book.items() if v.cluster == cluster_id)

    def revoke(self, holders: list[str], now: float | None = None) -> list[str]:
        """Block every unexpired certificate of ``holders`` and free their addresses.

        Returns the fingerprints newly blocked (empty: nothing to tell anyone).
        """
        now = time.time() if now is None else now
        added: list[str] = []
        with self._lock:
            for holder in holders:
                entry = self._book.pop(holder, None)
                if entry is None:
                    continue
                for fp, expires in entry.certs:
                    if expires > now and fp not in self._revoked:
                        self._revoked[fp] = Revoked(entry.cluster, holder, expires, entry.ip)
                        added.append(fp)
            if holders:
                self._save()
            if added:
                self._save_revoked()
        return added

    def release_cluster(self, cluster_id: str, now: float | None = None) -> list[str]:
        """Revoke the certificates of a cluster's members (and users), free their
        addresses; returns those holders."""
        gone = self.holders(cluster_id)
        self.revoke(gone, now)
        return gone

    def blocklist(self, cluster_id: str | None = None, now: float | None = None) -> list[str]:
        """The fingerprints to block: the cluster's (None: every cluster's), unexpired.

        Expired ones are dropped for good: Nebula refuses an expired certificate anyway.
        """
        now = time.time() if now is None else now
        with self._lock:
            expired = [fp for fp, r in self._revoked.items() if r.expires <= now]
            for fp in expired:
                del self._revoked[fp]
            if expired:
                self._save_revoked()
            return sorted(
                fp
                for fp, r in self._revoked.items()
                if cluster_id is None or r.cluster == cluster_id
            )

    def clusters(self) -> list[str]:
        """The clusters with a holder in the book."""
        with self._lock:
            return sorted({v.cluster for v in self._book.values()})

    def blocked_clusters(self, now: float | None = None) -> list[str]:
        """The clusters with an unexpired revoked certificate."""
        now = time.time() if now is None else now
        with self._lock:
            return sorted({r.cluster for r in self._revoked.values() if r.expires > now})

    def revoked(self, fp: str) -> Revoked | None:
        with self._lock:
            return self._revoked.get(fp)

    def _record(self, holder: str, crt: str, expires: float, now: float) -> None:
        """Remember a certificate signed for ``holder`` (lock held)."""
        entry = self._book.get(holder)
        if entry is None:
            return
        certs = tuple((f, e) for f, e in entry.certs if e > now)
        self._book[holder] = dataclasses.replace(entry, certs=(*certs, (fingerprint(crt), expires)))

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

    def grant(
        self,
        cluster_id: str,
        member_id: str,
        ends_at: float | None,
        public_key: str,
        now: float | None = None,
    ) -> OverlayGrant:
        """A member's certificate for its own ``public_key``, and how to reach the lighthouse."""
        now = time.time() if now is None else now
        ip = self.allocate(cluster_id, member_id)
        lifetime = self.lifetime(ends_at, now)
        crt, _ = self.sign(member_id, ip, [cluster_group(cluster_id)], lifetime, public_key)
        with self._lock:
            if member_id in self._book:
                old = self._book[member_id]
                self._book[member_id] = dataclasses.replace(
                    old,
                    cluster=cluster_id,
                    ip=ip,
                    pub=public_key,
                    expires=now + lifetime,
                    lifetime=lifetime,
                )
                self._record(member_id, crt, now + lifetime, now)
                self._save()
        return OverlayGrant(
            ca_crt=self.ca_crt,
            crt=crt,
            overlay_ip=ip,
            prefix_len=self.net.prefixlen,
            group=cluster_group(cluster_id),
            lighthouse_ip=self.lighthouse_ip,
            lighthouse_addresses=self.settings.advertised(),
            expires_at=now + lifetime,
            blocklist=self.blocklist(cluster_id, now),
        )

    def due(self, now: float) -> list[str]:
        """Members whose certificate has less than :data:`RENEW_AT` of its lifetime left."""
        with self._lock:
            return sorted(
                m
                for m, e in self._book.items()
                if e.pub and e.expires - now < e.lifetime * RENEW_AT
            )

    def renew(self, member_id: str, ends_at: float | None, now: float) -> OverlayRenewal | None:
        """A new certificate for the member's same key, address and group (None: unknown).

        Call :meth:`renewed` once the member took it (until then it stays due).
        """
        entry = self.entry(member_id)
        if entry is None or not entry.pub:
            return None
        lifetime = self.lifetime(ends_at, now)
        crt, _ = self.sign(member_id, entry.ip, [cluster_group(entry.cluster)], lifetime, entry.pub)
        with self._lock:  # pushed to its agent: the holder has it from now on
            self._record(member_id, crt, now + lifetime, now)
            self._save()
        return OverlayRenewal(member_id=member_id, crt=crt, expires_at=now + lifetime)

    def renewed(self, renewal: OverlayRenewal, now: float) -> None:
        """Record that the member now uses ``renewal`` (no-op if it was released meanwhile)."""
        with self._lock:
            entry = self._book.get(renewal.member_id)
            if entry is None:
                return
            self._book[renewal.member_id] = dataclasses.replace(
                entry, expires=renewal.expires_at, lifetime=renewal.expires_at - now
            )
            self._save()

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
