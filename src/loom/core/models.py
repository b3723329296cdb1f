"""The shared vocabulary of Loom (DESIGN.md §4 and §8): states, tiers, kinds.

Everything here is pure data: enums and small value helpers used by the
coordinator, the agent, the client and the explorer alike.
"""

from __future__ import annotations

import re
from enum import Enum, IntEnum


class DeviceKind(str, Enum):
    GPU = "gpu"
    CPU = "cpu"


class NodeState(str, Enum):
    REGISTERING = "registering"
    VERIFYING = "verifying"
    AVAILABLE = "available"
    ALLOCATED = "allocated"
    OFFLINE = "offline"
    DRAINED = "drained"  # its supplier stopped the agent (SIGTERM): gone, on purpose
    REMOVED = "removed"  # its owner removed it; its node key may not come back
    BANNED = "banned"


class DeviceState(str, Enum):
    CLAIMED = "claimed"
    VERIFIED = "verified"
    FAILED = "failed"


class ClusterState(str, Enum):
    REQUESTED = "requested"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    HEALING = "healing"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    FAILED = "failed"


class MemberState(str, Enum):
    ASSIGNED = "assigned"
    STARTING = "starting"
    READY = "ready"
    LOST = "lost"
    RELEASED = "released"


class SecurityTier(IntEnum):
    """Ordered: a spec asks for a minimum."""

    COMMUNITY = 1
    DATACENTER = 2
    CONFIDENTIAL = 3

    @property
    def slug(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> SecurityTier:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(t.slug for t in cls)
            raise ValueError(f"unknown security tier {text!r}; use one of: {names}") from None


class ConnectivityTier(IntEnum):
    """Ordered by measured downstream throughput (DESIGN.md §8)."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    ULTRA = 4

    @property
    def slug(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> ConnectivityTier:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(t.slug for t in cls)
            raise ValueError(f"unknown connectivity tier {text!r}; use one of: {names}") from None

    @classmethod
    def from_mbit(cls, mbit_per_s: float) -> ConnectivityTier:
        if mbit_per_s >= 1000:
            return cls.ULTRA
        if mbit_per_s >= 400:
            return cls.HIGH
        if mbit_per_s >= 100:
            return cls.MEDIUM
        return cls.LOW


_REGION_RE = re.compile(r"^(af|ap|eu|me|na|sa|us|oc|ca)-[a-z]+[0-9]*$")
CONTINENTS = ("af", "ap", "eu", "me", "na", "sa", "us", "oc", "ca")


def validate_region(text: str) -> str:
    """Return the normalized region slug (`<continent>-<part>`) or raise ValueError."""
    value = text.strip().lower()
    if not _REGION_RE.match(value):
        raise ValueError(
            f"invalid region {text!r}: use <continent>-<part> such as eu-west, us-east, ap-south "
            f"(continent one of {', '.join(CONTINENTS)})"
        )
    return value


def validate_country(text: str) -> str:
    """Return an upper-case ISO 3166 alpha-2 code or raise ValueError."""
    value = text.strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", value):
        raise ValueError(f"invalid country {text!r}: use an ISO 3166 alpha-2 code such as DE, US")
    return value
