"""HTTP API schemas of hardware verification: challenge history and fraud evidence."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from loom.protocol.api import Response


class ChallengeOut(Response):
    """One hardware challenge of one device (``GET /v1/nodes/{id}/challenges``)."""

    challenge_id: str
    device_id: str
    node_id: str
    device_class: str
    trigger: str = Field(description="initial | recheck | retry")
    started_at: float = Field(description="unix seconds")
    ended_at: float = Field(description="unix seconds")
    duration_s: float
    outcome: str = Field(description="passed | failed | error | interrupted")
    passed: bool
    reason: str
    measured_rate: float | None = Field(description="best-window INT8 ops/s")
    required_rate: float
    openings_checked: int = 0
    openings_failed: int = 0
    evidence: bool = Field(default=False, description="a wrong opening under a signed root")


class EvidenceOut(Response):
    """Fraud evidence; ``evidence`` is the JSON that ``loom evidence verify`` re-checks."""

    id: int
    challenge_id: str
    node_id: str
    device_id: str
    node_key: str
    created_at: float
    evidence: dict[str, Any]
