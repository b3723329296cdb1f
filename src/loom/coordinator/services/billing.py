"""Escrow, per-second metering, settlement, refunds and escrow exhaustion.

Every function runs inside the caller's DB transaction and takes the ledger lock first
(`ledger.lock_head`), then reads what it decides on. Metering state (`member_meters`) and
the ledger rows it produces commit together, so a coordinator killed at any moment either
did a whole settlement or none of it; settlement idempotency keys are derived from the
member and its metering state, so a retry of the same step maps to the same key.

* hold: at cluster creation, ``escrow_needed(price, devices, duration)`` summed over the
  placed members moves from ``user:<owner>`` to ``escrow:<cluster>`` (both appear in the
  public chain only under random aliases; meta holds no cluster id, name or memo).
* metering: a member accrues its *confirmed* time only (``Member.confirmed_s``, folded in
  by `services.confirmation` from observations by parties other than its own agent), in
  whole seconds through `loom.core.metering.Accrual` (exact carry, never rounded per
  period). Time nobody else vouched for is not billed, so not paid either.
* settlement: what accrued moves from the escrow to ``earnings:<node owner>`` minus the
  platform fee; capped pro rata by what the escrow holds.
* close: after teardown, the last seconds are settled, what the escrow could not cover
  is written off (recorded on the meter), and the rest of the escrow is refunded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import (
    AccountBalance,
    Cluster,
    LedgerAlias,
    Member,
    MemberMeter,
    Node,
)
from loom.coordinator.errors import PaymentRequired
from loom.coordinator.services import ledger
from loom.core import ledger as core
from loom.core.metering import (
    SECONDS_PER_HOUR,
    Accrual,
    EscrowStatus,
    billable_seconds,
    cap_pro_rata,
    cost_micro,
    escrow_needed,
    escrow_status,
    fee_split,
    seconds_left,
)
from loom.core.money import format_credits
from loom.core.spec import ClusterSpec

#: Clusters whose members may be accruing.
METERED_STATES = ("provisioning", "running", "healing", "terminating")
#: Clusters that can still be stopped for running out of escrow.
STOPPABLE_STATES = ("provisioning", "running", "healing")
WARN_PREFIX = "escrow runs out in"


#: Reload rows the identity map may hold from before the lock was taken.
_FRESH = {"populate_existing": True}


async def escrow_for(session: AsyncSession, cluster_id: str, duration_s: int) -> int:
    """What a cluster's members cost for ``duration_s``, each rounded up (what is held)."""
    rows = await session.execute(
        select(Member.price_micro, Member.units).where(Member.cluster_id == cluster_id)
    )
    return sum(escrow_needed(int(p), int(u), duration_s) for p, u in rows)


async def hold_for_cluster(
    session: AsyncSession, cluster: Cluster, spec: ClusterSpec, now: float
) -> int:
    """Move the cluster's escrow out of its owner's balance; refuse naming the shortfall."""
    await ledger.lock_head(session)
    amount = await escrow_for(session, cluster.id, spec.duration)
    if amount <= 0:
        return 0
    have = await ledger.balance(session, core.user_account(cluster.owner_key))
    if have < amount:
        short = format_credits(amount - have)
        raise PaymentRequired(
            "insufficient_funds",
            f"balance {format_credits(have)} credits, need {format_credits(amount)} to hold "
            f"{format_credits(cluster.hourly_micro)}/h for {spec.duration} s: deposit {short} "
            f"more with `loom credits deposit {short}` (or ask for a shorter duration)",
        )
    await ledger.post(
        session,
        core.HOLD,
        f"hold:{cluster.id}",
        core.hold_entries(cluster.owner_key, cluster.id, amount),
        {"memo": "escrow"},  # public: no cluster id, no name (see ledger_privacy)
        now,
    )
    return amount


def unsettled(meter: MemberMeter) -> int:
    return meter.accrued_micro - meter.settled_micro - meter.written_off_micro


@dataclass
class _Metered:
    member: Member
    supplier: str
    meter: MemberMeter


@dataclass
class SettleReport:
    clusters: list[str] = field(default_factory=list)
    settled_micro: int = 0
    transactions: int = 0


async def _meter_members(
    session: AsyncSession, now: float, cluster_ids: Sequence[str] | None
) -> dict[str, list[_Metered]]:
    stmt = (
        select(Member, Node.owner_key, MemberMeter)
        .join(Node, Node.id == Member.node_id)
        .outerjoin(MemberMeter, MemberMeter.member_id == Member.id)
        .where(Member.ready_at.is_not(None))
        .order_by(Member.cluster_id, Member.id)
        .execution_options(**_FRESH)
    )
    if cluster_ids is not None:
        stmt = stmt.where(Member.cluster_id.in_(list(cluster_ids)))
    else:
        stmt = stmt.join(Cluster, Cluster.id == Member.cluster_id).where(
            Cluster.state.in_(METERED_STATES)
        )
    out: dict[str, list[_Metered]] = defaultdict(list)
    for member, owner, meter in await session.execute(stmt):
        assert member.ready_at is not None
        if meter is None:
            meter = MemberMeter(
                member_id=member.id,
                cluster_id=member.cluster_id,
                supplier_key=owner,
                metered_until=member.ready_at,
                carry=0,
                accrued_micro=0,
                settled_micro=0,
                paid_micro=0,
                written_off_micro=0,
                closed=False,
                billed_s=0,
            )
            session.add(meter)
        if not meter.closed:
            # Only confirmed time is billed (Member.confirmed_s, see services.confirmation).
            seconds = billable_seconds(member.confirmed_s, meter.billed_s or 0)
            if seconds > 0:
                accrual, whole = Accrual(carry=meter.carry).add(
                    member.price_micro, member.units, seconds
                )
                meter.carry = accrual.carry
                meter.accrued_micro += whole
                meter.billed_s = (meter.billed_s or 0) + seconds
            end = member.ended_at if member.ended_at is not None else now
            meter.metered_until = max(meter.metered_until, min(end, now))
        out[member.cluster_id].append(_Metered(member, owner, meter))
    return out


async def meter_and_settle(
    session: AsyncSession, now: float, fee_bps: int, cluster_ids: Sequence[str] | None = None
) -> SettleReport:
    """Accrue healthy time up to ``now`` and settle it out of escrow (caller commits)."""
    await ledger.lock_head(session)
    report = SettleReport()
    metered = await _meter_members(session, now, cluster_ids)
    for cluster_id, items in metered.items():
        report.clusters.append(cluster_id)
        demands = {m.meter.member_id: unsettled(m.meter) for m in items if unsettled(m.meter)}
        if not demands:
            continue
        escrow = await ledger.balance(session, core.escrow_account(cluster_id))
        shares = cap_pro_rata(demands, escrow)
        for item in items:
            share = shares.get(item.meter.member_id, 0)
            if share <= 0:
                continue
            meter = item.meter
            key = (
                f"settle:{meter.member_id}:{round(meter.metered_until * 1_000_000)}:"
                f"{meter.settled_micro}"
            )
            await ledger.post(
                session,
                core.SETTLE,
                key,
                core.settle_entries(cluster_id, {item.supplier: share}, fee_bps),
                # Member and node ids are random and public-safe; no cluster id (the
                # escrow's alias must not name it), no name, no memo.
                core.settle_meta(fee_bps, member=meter.member_id, node=item.member.node_id),
                now,
            )
            to_supplier, _fee = fee_split(share, fee_bps)
            meter.settled_micro += share
            meter.paid_micro += to_supplier
            report.settled_micro += share
            report.transactions += 1
    await session.flush()
    return report


async def refund_cluster(session: AsyncSession, cluster_id: str, now: float) -> int:
    """Return what is left in the cluster's escrow to its owner (caller commits)."""
    await ledger.lock_head(session)
    cluster = await session.get(Cluster, cluster_id, populate_existing=True)
    if cluster is None:
        return 0
    left = await ledger.balance(session, core.escrow_account(cluster_id))
    if left <= 0:
        return 0
    await ledger.post(
        session,
        core.REFUND,
        f"refund:{cluster_id}:{left}",
        core.refund_entries(cluster_id, cluster.owner_key, left),
        {"memo": "unused escrow"},
        now,
    )
    return left


async def close_cluster(session: AsyncSession, cluster_id: str, now: float, fee_bps: int) -> int:
    """At teardown: settle the last seconds, write off what escrow cannot cover, refund.

    Returns the refund. Idempotent; the caller commits (with the terminal transition).
    """
    await meter_and_settle(session, now, fee_bps, [cluster_id])
    meters = (
        await session.execute(
            select(MemberMeter)
            .where(MemberMeter.cluster_id == cluster_id)
            .execution_options(**_FRESH)
        )
    ).scalars()
    for meter in meters:
        if not meter.closed:
            meter.written_off_micro += unsettled(meter)
            meter.closed = True
    return await refund_cluster(session, cluster_id, now)


def _fmt_left(seconds: int) -> str:
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


async def exhausted_clusters(session: AsyncSession, now: float, warn_s: float = 900.0) -> list[str]:
    """Clusters whose escrow cannot pay one more second; warn (in `reason`) those running low.

    Call right after `meter_and_settle` with the same ``now``. The caller commits and
    tears the returned clusters down.
    """
    await ledger.lock_head(session)
    rows = await session.execute(
        select(Cluster, Member, MemberMeter)
        .join(Member, Member.cluster_id == Cluster.id)
        .outerjoin(MemberMeter, MemberMeter.member_id == Member.id)
        .where(Cluster.state.in_(STOPPABLE_STATES))
        .execution_options(**_FRESH)
    )
    burn: dict[str, int] = defaultdict(int)
    owed: dict[str, int] = defaultdict(int)
    carry: dict[str, int] = defaultdict(int)
    clusters: dict[str, Cluster] = {}
    for cluster, member, meter in rows:
        clusters[cluster.id] = cluster
        if member.ready_at is not None and member.ended_at is None:
            burn[cluster.id] += member.price_micro * member.units
        if meter is not None:
            owed[cluster.id] += unsettled(meter)
            carry[cluster.id] = min(SECONDS_PER_HOUR - 1, carry[cluster.id] + meter.carry)
    escrows = await ledger.balances_of(session, [core.escrow_account(cid) for cid in clusters])
    out: list[str] = []
    for cid, cluster in clusters.items():
        if not burn[cid]:
            continue
        escrow = escrows.get(core.escrow_account(cid), 0)
        kw = {"unsettled_micro": min(owed[cid], escrow), "carry": carry[cid]}
        if owed[cid] > escrow:
            out.append(cid)
            continue
        status = escrow_status(escrow, burn[cid], warn_seconds=int(warn_s), **kw)
        if status is EscrowStatus.EXHAUSTED:
            out.append(cid)
        elif status is EscrowStatus.LOW:
            left = seconds_left(escrow, burn[cid], **kw) or 0
            warning = (
                f"{WARN_PREFIX} {_fmt_left(left)}: {format_credits(escrow)} credits left at "
                f"{format_credits(burn[cid])}/h; the cluster is torn down when it is spent"
            )
            # A reason the healer acts on ("degraded…") is kept; the warning waits.
            if cluster.reason != warning and not cluster.reason.startswith("degraded"):
                cluster.reason = warning
    return out


# --------------------------------------------------------------------------- reading


async def escrowed_by(session: AsyncSession, owner: str) -> int:
    """Credit held in the escrows of ``owner``'s clusters."""
    rows = await session.execute(
        select(AccountBalance.balance_micro)
        .join(LedgerAlias, LedgerAlias.alias == AccountBalance.account)
        .join(Cluster, LedgerAlias.account == literal("escrow:") + Cluster.id)
        .where(Cluster.owner_key == owner)
    )
    return sum(int(b) for (b,) in rows)


@dataclass
class EarningLine:
    key: str  # node id or cluster id
    name: str
    settled_micro: int = 0  # gross taken out of escrow for this supplier
    paid_micro: int = 0  # net credited to earnings (settled minus fee)
    pending_micro: int = 0  # accrued or accruing, not settled yet (gross)


async def earnings(
    session: AsyncSession, supplier: str, now: float
) -> tuple[list[EarningLine], list[EarningLine]]:
    """Per node and per cluster: settled, paid and pending, for one supplier's nodes."""
    rows = await session.execute(
        select(Member, Node.name, MemberMeter)
        .join(Node, Node.id == Member.node_id)
        .outerjoin(MemberMeter, MemberMeter.member_id == Member.id)
        .where(Node.owner_key == supplier, Member.ready_at.is_not(None))
    )
    nodes: dict[str, EarningLine] = {}
    clusters: dict[str, EarningLine] = {}
    for member, node_name, meter in rows:
        assert member.ready_at is not None
        closed = meter is not None and meter.closed
        billed = (meter.billed_s or 0) if meter is not None else 0
        seconds = billable_seconds(member.confirmed_s, billed)
        live = 0 if closed else cost_micro(member.price_micro, member.units, seconds)
        settled = meter.settled_micro if meter is not None else 0
        paid = meter.paid_micro if meter is not None else 0
        pending = (unsettled(meter) if meter is not None and not closed else 0) + live
        for table, key, name in (
            (nodes, member.node_id, node_name),
            (clusters, member.cluster_id, member.cluster_id),
        ):
            line = table.setdefault(key, EarningLine(key, name))
            line.settled_micro += settled
            line.paid_micro += paid
            line.pending_micro += pending
    return sorted(nodes.values(), key=lambda x: x.key), sorted(
        clusters.values(), key=lambda x: x.key
    )


async def clusters_to_meter(session: AsyncSession) -> list[str]:
    """Clusters with at least one member that became ready and may still be accruing."""
    rows = await session.execute(
        select(Member.cluster_id)
        .join(Cluster, Cluster.id == Member.cluster_id)
        .where(Cluster.state.in_(METERED_STATES), Member.ready_at.is_not(None))
        .distinct()
    )
    return sorted(rows.scalars())


async def ended_with_escrow(session: AsyncSession) -> list[str]:
    """Ended clusters that still hold escrow (a teardown interrupted before its refund)."""
    rows = await session.execute(
        select(Cluster.id)
        .join(LedgerAlias, LedgerAlias.account == literal("escrow:") + Cluster.id)
        .join(AccountBalance, AccountBalance.account == LedgerAlias.alias)
        .where(Cluster.state.in_(("terminated", "failed")), AccountBalance.balance_micro > 0)
    )
    return sorted(rows.scalars())
