"""What ``member.start`` carries for the cluster's Nebula overlay (issue 10).

The coordinator is the overlay's authority: it signs one short-lived certificate per
member (name = member id, groups = the cluster) and tells the member where the lighthouse
is. The agent runs that member's own Nebula inside the member's network namespace, with a
firewall that admits only the cluster's group, and the Ray node binds ``overlay_ip``.

**Private keys never leave the machine that uses them.** Before ``member.start`` the
coordinator sends ``member.overlay_key`` (``loom.protocol.commands.MemberOverlayKey``): the
agent generates the member's keypair (``nebula-cert keygen``, key 0600 in the member's
directory) and answers the public key; the coordinator signs that public key
(``nebula-cert sign -in-pub``) and the grant carries only the certificate. While the
cluster lives the coordinator renews the certificate before it expires and pushes it with
``member.overlay_cert`` (:class:`OverlayRenewal`, sent as ``MemberOverlayCert``); the
agent swaps the file and sends
Nebula SIGHUP (it reloads its PKI, keeping its tunnels). A member (or user certificate)
that leaves the cluster is revoked: its certificates' fingerprints join the cluster's
blocklist, which every remaining member gets with ``member.overlay_blocklist`` (written as
Nebula's ``pki.blocklist``, SIGHUP) and every later one in its grant.
``loom cluster connect`` does the same: the user's machine generates its key and posts
only the public key (:class:`OverlayJoin`).

The commands are plain dicts today; :func:`grant_to_args` / :func:`grant_from_args` put
the grant under one key and read it back, typed and validated.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ARGS_KEY = "overlay"
_PEM = re.compile(
    r"^-----BEGIN NEBULA [A-Z0-9 ]+-----\n[A-Za-z0-9+/=\n]+-----END NEBULA [A-Z0-9 ]+-----\n?$"
)
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,255}:[0-9]{1,5}$")
_PUBLIC_KEY = re.compile(
    r"^-----BEGIN NEBULA X25519 PUBLIC KEY-----\n[A-Za-z0-9+/=\n]+"
    r"-----END NEBULA X25519 PUBLIC KEY-----\n?$"
)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
# Nebula tuning shared by every Nebula Loom runs (members, lighthouses, ``cluster connect``).
#: The UDP socket's receive and send buffers (``listen.read_buffer``/``write_buffer``, set
#: with SO_RCVBUFFORCE: needs CAP_NET_ADMIN, else Nebula keeps the default). With the
#: system's default (208 KiB) the receiving Nebula lost ~15 % of the datagrams of a bulk
#: TCP stream to a full buffer whenever it was descheduled; 8 MiB: none, and 1.4-1.7x the
#: throughput.
SOCKET_BUFFER = 8 << 20
#: How long the peer that a lighthouse query reaches waits before punching back. Well
#: under ``handshakes.try_interval``: Nebula 1.6.1 sends its first relayed handshake on
#: its second try (one interval after the first direct one), so a punch that comes in
#: time lets that try's direct packet through first (Nebula's default, 1 s, never does,
#: and 1.6 never moves a relayed tunnel to a direct path later). Not 0: the punch should
#: reach the querier's NAT after the querier's own first packet left it.
PUNCH_DELAY = "10ms"
#: The most fingerprints one blocklist carries (a cluster's revoked, unexpired certificates).
MAX_BLOCKLIST = 4096


def check_fingerprints(value: list[str]) -> list[str]:
    for item in value:
        if not _FINGERPRINT.match(item):
            raise ValueError(
                f"fingerprint {item[:80]!r} must be 64 lowercase hex digits (nebula-cert print)"
            )
    return value


def check_pem(value: str) -> str:
    if not _PEM.match(value):
        raise ValueError("must be a PEM block written by nebula-cert")
    if "PRIVATE KEY" in value:
        raise ValueError("a private key never travels: send the public key only")
    return value


def check_public_key(value: str) -> str:
    if not _PUBLIC_KEY.match(value):
        raise ValueError("must be a Nebula X25519 public key (nebula-cert keygen -out-pub)")
    return value


class OverlayError(ValueError):
    """The overlay part of a command is malformed; the message says what is wrong."""


class LighthouseRef(BaseModel):
    """One more lighthouse (and relay) of the network: with replicas, each runs one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ip: str
    addresses: list[str] = Field(min_length=1, max_length=8)

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return str(ipaddress.IPv4Address(value))

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return check_host_ports(value)


def check_host_ports(value: list[str]) -> list[str]:
    for item in value:
        if not _HOST_PORT.match(item) or not 0 < int(item.rpartition(":")[2]) < 65536:
            raise ValueError(f"lighthouse address {item!r} must be host:port")
    return value


class OverlayGrant(BaseModel):
    """One member's place on the overlay: its certificate and how to find the others.

    No private key: the member's agent (or the user's machine) generated it and keeps it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_crt: str = Field(max_length=8192)
    crt: str = Field(max_length=8192)
    #: This member's overlay address and the network's prefix length.
    overlay_ip: str
    prefix_len: int = Field(ge=8, le=30)
    #: The group every member (and user certificate) of this cluster carries.
    group: str
    #: The lighthouse (and relay): its overlay address, and the UDP host:port it listens on.
    lighthouse_ip: str
    lighthouse_addresses: list[str] = Field(min_length=1, max_length=8)
    #: The network's other lighthouses (coordinator replicas each run one; every member
    #: reports to all of them and may be relayed by any). Read both through
    #: :meth:`lighthouses`.
    more_lighthouses: list[LighthouseRef] = Field(default_factory=list, max_length=7)
    #: When the certificate expires (unix time; the coordinator renews while the cluster lives).
    expires_at: float
    #: Revoked certificates of this cluster (fingerprints, Nebula's ``pki.blocklist``):
    #: removed members' and users', still unexpired. Later changes: ``member.overlay_blocklist``.
    blocklist: list[str] = Field(default_factory=list, max_length=MAX_BLOCKLIST)

    @field_validator("ca_crt", "crt")
    @classmethod
    def _pem(cls, value: str) -> str:
        return check_pem(value)

    @field_validator("overlay_ip", "lighthouse_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return str(ipaddress.IPv4Address(value))

    @field_validator("blocklist")
    @classmethod
    def _blocklist(cls, value: list[str]) -> list[str]:
        return check_fingerprints(value)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not _GROUP.match(value):
            raise ValueError(f"group must match {_GROUP.pattern}")
        return value

    @field_validator("lighthouse_addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return check_host_ports(value)

    def lighthouses(self) -> dict[str, list[str]]:
        """Every lighthouse's overlay address -> where to send it UDP (the first is
        ``lighthouse_ip``): Nebula's ``static_host_map``, its ``lighthouse.hosts`` and
        ``relay.relays`` are its keys."""
        found = {self.lighthouse_ip: list(self.lighthouse_addresses)}
        for more in self.more_lighthouses:
            found.setdefault(more.ip, list(more.addresses))
        return found


def grant_to_args(args: dict[str, Any], grant: OverlayGrant | None) -> dict[str, Any]:
    """``args`` with the grant under :data:`ARGS_KEY` (unchanged when there is none)."""
    if grant is None:
        return args
    return {**args, ARGS_KEY: grant.model_dump(mode="json")}


def grant_from_args(args: dict[str, Any]) -> OverlayGrant | None:
    """The grant in a ``member.start`` command, or None; :class:`OverlayError` if malformed."""
    raw = args.get(ARGS_KEY)
    if raw is None:
        return None
    try:
        return OverlayGrant.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise OverlayError(f"member.start overlay.{where}: {first.get('msg')}") from None


class OverlayRenewal(BaseModel):
    """A renewed certificate for the same key, address and group (the authority's output)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    member_id: str
    crt: str = Field(max_length=8192)
    expires_at: float

    @field_validator("crt")
    @classmethod
    def _pem(cls, value: str) -> str:
        return check_pem(value)


class OverlayJoin(BaseModel):
    """``POST /v1/clusters/{ref}/overlay``: the user's own public key, to be signed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    public_key: str = Field(max_length=1024)

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return check_public_key(value)


class OverlayRevoked(BaseModel):
    """``DELETE /v1/clusters/{ref}/overlay/{name}``: the certificates now blocked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    #: Fingerprints newly on the cluster's blocklist (the user's unexpired certificates).
    fingerprints: list[str] = Field(default_factory=list)
