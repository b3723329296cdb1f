"""What ``member.start`` carries for the cluster's Nebula overlay (issue 10).

The coordinator is the overlay's authority: it signs one short-lived certificate per
member (name = member id, groups = the cluster) and tells the member where the lighthouse
is. The agent runs that member's own Nebula inside the member's network namespace, with a
firewall that admits only the cluster's group, and the Ray node binds ``overlay_ip``.

The command is a plain dict today; :func:`grant_to_args` / :func:`grant_from_args` put
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


class OverlayError(ValueError):
    """The overlay part of a command is malformed; the message says what is wrong."""


class OverlayGrant(BaseModel):
    """One member's place on the overlay: its certificate, key and how to find the others."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_crt: str = Field(max_length=8192)
    crt: str = Field(max_length=8192)
    key: str = Field(max_length=1024)
    #: This member's overlay address and the network's prefix length.
    overlay_ip: str
    prefix_len: int = Field(ge=8, le=30)
    #: The group every member (and user certificate) of this cluster carries.
    group: str
    #: The lighthouse (and relay): its overlay address, and the UDP host:port it listens on.
    lighthouse_ip: str
    lighthouse_addresses: list[str] = Field(min_length=1, max_length=8)
    #: Seconds until the certificate expires (the coordinator renews while the cluster lives).
    expires_at: float

    @field_validator("ca_crt", "crt", "key")
    @classmethod
    def _pem(cls, value: str) -> str:
        if not _PEM.match(value):
            raise ValueError("must be a PEM block written by nebula-cert")
        return value

    @field_validator("overlay_ip", "lighthouse_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return str(ipaddress.IPv4Address(value))

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not _GROUP.match(value):
            raise ValueError(f"group must match {_GROUP.pattern}")
        return value

    @field_validator("lighthouse_addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            if not _HOST_PORT.match(item) or not 0 < int(item.rpartition(":")[2]) < 65536:
                raise ValueError(f"lighthouse address {item!r} must be host:port")
        return value


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
