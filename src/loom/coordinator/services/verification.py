"""Hardware verification, database side: device classes, challenge records, evidence, bans.

Every function takes the database session explicitly; the caller commits. The driver that
talks to agents is ``loom.coordinator.challenger``; the re-challenge loop is
``loom.coordinator.loops.challenger``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.bus import publish_on
from loom.coordinator.config import Settings
from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import ChallengeEvidence, Device, DeviceChallenge, Node
from loom.coordinator.services import nodes as node_service
from loom.core.catalog import get_model, is_known_model
from loom.core.challenge import ChallengeResult, device_classes, params_for
from loom.core.challenge.capacity import cores_supported
from loom.core.challenge.params import UnknownDeviceClass
from loom.core.models import DeviceKind, DeviceState, NodeState
from loom.protocol.events import ChangeCause
from loom.protocol.verification import ChallengeOut, EvidenceOut

#: Device classes that only a CPU may be challenged with (never a GPU's claim).
NON_GPU_CLASSES = frozenset({"cpu", "test"})
DAY_S = 86_400.0


@dataclass(frozen=True)
class ChallengerConfig:
    """How the coordinator schedules challenges. The challenge itself (sizes, rounds,
    thresholds, retries per day) comes from the per-class table in
    ``core/data/challenge_params.yaml``; these are only scheduling knobs.

    Each can be overridden with ``Settings.extra["challenge.<name>"]``.
    """

    #: Fraction of a verified idle device's time spent on unannounced re-challenges.
    budget: float = 0.01
    #: How often the re-challenge loop looks at connected devices.
    loop_s: float = 5.0
    #: The class a node's CPU is challenged with (``test`` in fast tests).
    cpu_class: str = "cpu"
    #: Wait before retrying a failed device (within the class's ``retries_per_day``).
    failed_retry_s: float = 120.0
    #: First wait before retrying a challenge that errored (disconnect); doubles each time.
    error_retry_s: float = 5.0
    error_retry_max_s: float = 300.0
    #: A node offline longer than this proves its devices again when it returns.
    reverify_after_offline_s: float = 3600.0
    #: Seconds the agent has to accept a challenge, and to answer one batch of openings.
    start_timeout_s: float = 30.0
    open_timeout_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ChallengerConfig:
        changes: dict[str, Any] = {}
        for f in fields(cls):
            raw = settings.extra.get(f"challenge.{f.name}")
            if raw is not None:
                changes[f.name] = raw if f.type == "str" else float(raw)
        return cls(**changes)


def device_class_for(device: Device, config: ChallengerConfig) -> str | None:
    """The challenge class of a device, or None when no parameters exist for its claim.

    A CPU is challenged in ``config.cpu_class`` and certified at its measured rate. A GPU is
    challenged as the catalog model it claims, and only with a GPU model's parameters.
    """
    if device.kind == DeviceKind.CPU.value:
        return config.cpu_class
    model = device.model
    if model in NON_GPU_CLASSES or model not in device_classes() or not is_known_model(model):
        return None
    return model if get_model(model).is_gpu else None


def cpu_device_id(node_id: str) -> str:
    return f"{node_id}:cpu"


def needs_verification(node_id: str, devices: Iterable[Device]) -> bool:
    """True while the node's CPU is unverified or some device is still only claimed."""
    cpu_ok = False
    for dev in devices:
        if dev.state == DeviceState.CLAIMED.value:
            return True
        if dev.id == cpu_device_id(node_id) and dev.state == DeviceState.VERIFIED.value:
            cpu_ok = True
    return not cpu_ok


async def present_devices(session: AsyncSession, node_ids: Sequence[str]) -> list[Device]:
    out: list[Device] = []
    for chunk in chunks(sorted(set(node_ids))):  # bounded IN-lists (db.batching)
        rows = await session.execute(
            select(Device)
            .where(Device.node_id.in_(chunk), Device.present.is_(True))
            .order_by(Device.node_id, Device.kind.desc(), Device.id)  # cpu before gpu
        )
        out.extend(rows.scalars())
    return out


@dataclass
class DeviceHistory:
    """A device's recent challenges, as the scheduler needs them."""

    last_outcome: str = ""
    last_ended_at: float = 0.0
    #: passed or failed attempts (not errors) in the last 24 h
    attempts_24h: int = 0
    #: errors since the last passed/failed attempt
    errors_in_a_row: int = 0
    #: duration of the latest passed challenge (monotonic seconds), if any
    last_pass_duration_s: float | None = None


async def recent_history(
    session: AsyncSession, device_ids: Sequence[str], now: float
) -> dict[str, DeviceHistory]:
    out: dict[str, DeviceHistory] = {}
    found: list[tuple[int, str, str, float, float]] = []
    for chunk in chunks(sorted(set(device_ids))):  # bounded IN-lists (db.batching)
        rows = await session.execute(
            select(
                DeviceChallenge.id,
                DeviceChallenge.device_id,
                DeviceChallenge.outcome,
                DeviceChallenge.ended_at,
                DeviceChallenge.duration_s,
            )
            .where(DeviceChallenge.device_id.in_(chunk))
            .where(DeviceChallenge.ended_at >= now - DAY_S)
        )
        found.extend((r[0], r[1], r[2], r[3], r[4]) for r in rows)
    found.sort()  # challenge order, as one query ordered by id gave it
    for _id, device_id, outcome, ended_at, duration_s in found:
        h = out.setdefault(device_id, DeviceHistory())
        h.last_outcome, h.last_ended_at = outcome, ended_at
        if outcome == "error":
            h.errors_in_a_row += 1
            continue
        h.errors_in_a_row = 0
        if outcome in ("passed", "failed"):
            h.attempts_24h += 1
        if outcome == "passed":
            h.last_pass_duration_s = duration_s
    return out


def record_result(
    session: AsyncSession,
    *,
    node: Node,
    device: Device | None,
    challenged_model: str,
    result: ChallengeResult,
    outcome: str,
    trigger: str,
    started_at: float,
    ended_at: float,
    duration_s: float,
) -> list[ChallengeEvidence]:
    """Store a challenge's verdict and move the device: passed → verified, failed → failed.

    ``error`` and ``interrupted`` leave the device as it was. A device whose claim changed
    while it was being challenged (another model) is left alone too.
    """
    session.add(
        DeviceChallenge(
            challenge_id=result.challenge_id.hex(),
            device_id=result.device_id,
            node_id=node.id,
            device_class=result.device_class,
            trigger=trigger,
            started_at=started_at,
            ended_at=ended_at,
            duration_s=duration_s,
            outcome=outcome,
            passed=outcome == "passed",
            reason=result.reason,
            measured_rate=result.measured_rate,
            required_rate=result.required_rate,
            openings_checked=result.openings_checked,
            openings_failed=result.openings_failed,
        )
    )
    if device is not None and device.model == challenged_model:
        if outcome == "passed":
            device.state = DeviceState.VERIFIED.value
            if device.kind == DeviceKind.CPU.value:
                # Offer what was measured, not what was claimed (core.challenge.capacity).
                device.verified_units = cores_supported(
                    result.measured_rate or 0.0, core_rate(result), device.count or 1
                )
        elif outcome == "failed":
            device.state = DeviceState.FAILED.value
    publish_on(session, node.id, ChangeCause.DEVICE_VERDICT)  # and a reliability input
    rows: list[ChallengeEvidence] = []
    for ev in result.evidence:
        row = ChallengeEvidence(
            challenge_id=result.challenge_id.hex(),
            node_id=node.id,
            device_id=result.device_id,
            node_key=ev.node_public_key.hex(),
            created_at=ended_at,
            evidence_json=ev.model_dump_json(),
        )
        session.add(row)
        rows.append(row)
    return rows


def core_rate(result: ChallengeResult) -> float:
    """Ops/s counted as one core for the result's class (its pass floor if none is set)."""
    try:
        rate = params_for(result.device_class).core_rate
    except UnknownDeviceClass:
        rate = None
    return rate or result.required_rate


def ban(session: AsyncSession, node: Node, reason: str, now: float) -> bool:
    """Ban a node for proven fraud; False when it already was."""
    if node.state == NodeState.BANNED.value:
        return False
    if node.state == NodeState.REGISTERING.value:
        node_service.transition(session, node, NodeState.VERIFYING, "verifying", now)
    return node_service.transition(session, node, NodeState.BANNED, reason[:255], now)


async def history(session: AsyncSession, node_id: str, limit: int = 100) -> list[ChallengeOut]:
    await node_service.get_node(session, node_id)  # 404 for an unknown node
    rows = list(
        (
            await session.execute(
                select(DeviceChallenge)
                .where(DeviceChallenge.node_id == node_id)
                .order_by(DeviceChallenge.id.desc())
                .limit(limit)
            )
        ).scalars()
    )
    with_evidence = set(
        (
            await session.execute(
                select(ChallengeEvidence.challenge_id).where(ChallengeEvidence.node_id == node_id)
            )
        ).scalars()
    )
    return [
        ChallengeOut(
            challenge_id=r.challenge_id,
            device_id=r.device_id,
            node_id=r.node_id,
            device_class=r.device_class,
            trigger=r.trigger,
            started_at=r.started_at,
            ended_at=r.ended_at,
            duration_s=r.duration_s,
            outcome=r.outcome,
            passed=r.passed,
            reason=r.reason,
            measured_rate=r.measured_rate,
            required_rate=r.required_rate,
            openings_checked=r.openings_checked,
            openings_failed=r.openings_failed,
            evidence=r.challenge_id in with_evidence,
        )
        for r in rows
    ]


async def list_evidence(
    session: AsyncSession, *, node_id: str | None = None, limit: int = 100
) -> list[EvidenceOut]:
    stmt = select(ChallengeEvidence).order_by(ChallengeEvidence.id.desc()).limit(limit)
    if node_id:
        stmt = stmt.where(ChallengeEvidence.node_id == node_id)
    out: list[EvidenceOut] = []
    for row in (await session.execute(stmt)).scalars():
        out.append(
            EvidenceOut(
                id=row.id,
                challenge_id=row.challenge_id,
                node_id=row.node_id,
                device_id=row.device_id,
                node_key=row.node_key,
                created_at=row.created_at,
                evidence=node_service.load_json_lenient(row.evidence_json),
            )
        )
    return out
