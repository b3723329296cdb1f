"""Confirmed readiness: a member is billed only while someone other than its own agent
vouches for it (issue 14 §3).

Who may confirm a member:

* another member's agent of the same cluster, reporting which Ray node ids its own Ray
  node sees ALIVE in the head's GCS (``member.seen``; see `loom.coordinator.confirmation`),
  never the member's own agent, and never for a Ray node id that two members claim;
* the coordinator itself, probing the head's Ray dashboard through the head agent's
  tunnel with the cluster token (and a fresh wrong token that must be refused).

Each confirmation is folded into ``Member.confirmed_s`` with
`loom.core.metering.Confirmation` (gaps longer than `MAX_GAP_S` do not count); billing
accrues only those seconds. ``Member.confirm_note`` says who confirmed it last, or why a
check failed, for the cluster's status.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import Member
from loom.core.metering import Confirmation
from loom.core.models import MemberState

#: How often the coordinator gathers confirmations of each cluster's members.
CONFIRM_INTERVAL_S = 10.0
#: A gap between two confirmations longer than this is not billed.
MAX_GAP_S = 3.5 * CONFIRM_INTERVAL_S
NOT_YET = "not confirmed yet by anyone but its own agent"


@dataclass(frozen=True)
class Status:
    confirmed: bool
    reason: str


def confirmation_of(member: Member) -> Confirmation:
    return Confirmation(max(0.0, member.confirmed_s or 0.0), member.confirmed_last)


def status_of(member: Member, now: float) -> Status:
    """Whether the member counts as confirmed now, and why (not)."""
    if member.state != MemberState.READY.value:
        return Status(False, f"member is {member.state}: not billed")
    if confirmation_of(member).is_current(now, MAX_GAP_S):
        return Status(True, member.confirm_note or "confirmed")
    if member.confirmed_last is None:
        return Status(False, member.confirm_note or NOT_YET)
    ago = int(now - member.confirmed_last)
    why = member.confirm_note or "no check answered"
    return Status(False, f"last confirmed {ago} s ago; since then: {why}: not billed")


def record(member: Member, at: float, by: str) -> None:
    """Fold one confirmation of a ready member at ``at`` (coordinator clock) into its row."""
    if member.state != MemberState.READY.value:
        return
    c = confirmation_of(member).observe(at, MAX_GAP_S)
    member.confirmed_s, member.confirmed_last = c.confirmed_s, c.last_at
    member.confirm_note = f"confirmed by {by}"[:300]


def refuse(member: Member, why: str) -> None:
    """A check of the member failed: say so (its confirmed time does not grow)."""
    member.confirm_note = why[:300]


async def ready_members(session: AsyncSession, cluster_id: str) -> list[Member]:
    rows = await session.execute(
        select(Member)
        .where(Member.cluster_id == cluster_id, Member.state == MemberState.READY.value)
        .order_by(Member.created_at, Member.id)
    )
    return list(rows.scalars())


def usurpers(members: Iterable[Member]) -> set[str]:
    """Members claiming a Ray node id that an earlier-ready member of the cluster claimed.

    A Ray node id is how other members vouch for one (its agent reports it at start):
    the first claim wins, so copying another member's id confirms nothing.
    """
    first: dict[str, Member] = {}
    out: set[str] = set()
    for m in sorted(members, key=lambda m: (m.ready_at or 0.0, m.created_at, m.id)):
        if not m.ray_node_id:
            continue
        if m.ray_node_id in first:
            out.add(m.id)
        else:
            first[m.ray_node_id] = m
    return out


async def apply_seen(
    session: AsyncSession,
    cluster_id: str,
    reporter_member_id: str,
    reporter_node_id: str,
    alive_ray_ids: Iterable[str],
    at: float,
) -> list[str]:
    """What the agent of ``reporter_member_id`` saw ALIVE in its cluster's GCS.

    Confirms every *other* ready member of the cluster (on another node) whose Ray node id
    is in the list; the reporter's own members are never confirmed by it. Returns the ids
    confirmed. A reporter that is not a ready member of the cluster on that node confirms
    nothing.
    """
    members = await ready_members(session, cluster_id)
    reporter = next((m for m in members if m.id == reporter_member_id), None)
    if reporter is None or reporter.node_id != reporter_node_id:
        return []
    alive = {str(r) for r in alive_ray_ids}
    dupes = usurpers(members)
    done: list[str] = []
    for member in members:
        if member.node_id == reporter_node_id:
            continue
        if not member.ray_node_id or member.id in dupes:
            refuse(member, "its Ray node id is missing or claimed by another member")
        elif member.ray_node_id in alive:
            record(member, at, f"node {reporter_node_id} (sees it ALIVE in the head's GCS)")
            done.append(member.id)
        else:
            refuse(member, f"node {reporter_node_id} does not see it ALIVE in the head's GCS")
    return done
