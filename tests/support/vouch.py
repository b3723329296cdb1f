"""Confirm cluster members directly, standing in for an honest peer (tests without Ray).

Billing counts only time that someone other than a member's own agent confirmed
(`loom.coordinator.services.confirmation`). Fake agents run no Ray, so nobody can honestly
vouch for them: tests of the money plane that need billed time record the confirmations
that another member's agent (or the coordinator's probe) would give, through the same
service function the coordinator uses.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from loom.coordinator.db.models import Member
from loom.coordinator.services import confirmation


async def vouch(sessions: Any, cluster_id: str | None, at: float | None = None) -> int:
    """Confirm every ready member of the cluster (of every cluster: None) at ``at`` (now);
    returns how many."""
    at = time.time() if at is None else at
    async with sessions() as session:
        stmt = select(Member).where(Member.state == "ready")
        if cluster_id is not None:
            stmt = stmt.where(Member.cluster_id == cluster_id)
        rows = await session.execute(stmt)
        members = list(rows.scalars())
        for member in members:
            confirmation.record(member, at, "a test standing in for an honest peer")
        await session.commit()
    return len(members)
