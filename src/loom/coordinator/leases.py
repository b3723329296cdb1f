"""Leased work items: how several coordinator replicas share one database's work.

Two kinds of lease, both rows in the database (the only source of truth):

* **Row leases** on work-item tables (``clusters``, ``devices``): three columns,
  ``lock_owner``, ``lock_token``, ``lock_expires_at``. ``claim`` picks due rows whose lease
  is free or expired (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two replicas claiming at
  once never pick the same row; SQLite's single writer serializes the stamping UPDATE,
  which re-checks expiry) and stamps each with the owner and a fresh random token.
* **Role leases** on a named row of ``leases`` (name, owner, token, expires_at): "the one
  settler", "the one ledger sequencer". ``claim_role`` takes the role when it is free or
  expired, or extends it when the caller already holds it.

While working the owner ``renew``\\s; when done it ``release``\\s. Every apply of a step's
result runs in a transaction that begins with a guard: ``UPDATE ... WHERE id = :id AND
lock_token = :token`` (``guard`` / ``guard_role``). Zero rows updated means the lease was
taken over (this owner stalled past expiry): the step's result is dropped (the caller rolls
back), logged and counted in ``stale_applies``. On PostgreSQL the guard's row lock is held
until commit, so a takeover waits for the apply or the apply sees the new token — never both.
Each guarded apply also writes a ``lease_audit`` row in the same transaction, so tests (and
operators) can check that no (item, action) was ever done twice.

Nothing here commits: the caller owns the transaction (claim, then commit at once).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Table, and_, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import LeaseAudit, RoleLease

log = logging.getLogger(__name__)

#: Applies dropped because their lease had been taken over, by kind (table or role name).
stale_applies: dict[str, int] = {}


class StaleLease(RuntimeError):
    """The lease is no longer ours (taken over after expiry, or released)."""

    def __init__(self, lease: Lease, what: str) -> None:
        super().__init__(
            f"lease on {lease.kind} {lease.item_id} (owner {lease.owner}) is stale: {what}"
        )
        self.lease = lease


@dataclass(frozen=True)
class Lease:
    """A held lease: on a row of `kind` (a table name) or on the role `item_id` (kind "role")."""

    kind: str
    item_id: str
    owner: str
    token: str
    expires_at: float


ROLE = "role"


def new_token() -> str:
    return secrets.token_hex(16)


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount or 0)


def _is_postgresql(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


def _free(table: Table, now: float) -> ColumnElement[bool]:
    c = table.c
    return or_(c.lock_expires_at.is_(None), c.lock_expires_at < now)


def _count_stale(kind: str, item_id: str, owner: str, action: str) -> None:
    stale_applies[kind] = stale_applies.get(kind, 0) + 1
    log.warning(
        "stale lease: %s %s was taken over from %s; its %r result is dropped",
        kind,
        item_id,
        owner,
        action,
    )


def audit(session: AsyncSession, lease: Lease, action: str, now: float) -> None:
    """Record one action done under `lease` (same transaction as the apply)."""
    session.add(
        LeaseAudit(
            kind=lease.kind,
            item_id=lease.item_id,
            owner=lease.owner,
            token=lease.token,
            action=action[:64],
            at=now,
        )
    )


# ------------------------------------------------------------------------- row leases


async def claim(
    session: AsyncSession,
    table: Table,
    *,
    owner: str,
    now: float,
    ttl_s: float,
    where: ColumnElement[bool] | None = None,
    limit: int = 1,
    order_by: Any = None,
) -> list[Lease]:
    """Claim up to `limit` rows of `table` matching `where` whose lease is free or expired.

    Each claimed row gets `owner`, a fresh token and ``now + ttl_s``; commit soon after.
    """
    c = table.c
    cond = _free(table, now) if where is None else and_(_free(table, now), where)
    stmt = select(c.id).where(cond).limit(limit)
    if order_by is not None:
        stmt = stmt.order_by(order_by)
    if _is_postgresql(session):
        stmt = stmt.with_for_update(skip_locked=True)
    ids = [str(r) for r in (await session.execute(stmt)).scalars()]
    leases: list[Lease] = []
    for item_id in ids:
        token = new_token()
        result = await session.execute(
            update(table)
            .where(c.id == item_id, cond)  # re-checked: SQLite selected without a lock
            .values(lock_owner=owner, lock_token=token, lock_expires_at=now + ttl_s)
        )
        if _rowcount(result) == 1:  # SQLite: another writer may have stamped it meanwhile
            leases.append(Lease(table.name, item_id, owner, token, now + ttl_s))
    return leases


async def claim_one(
    session: AsyncSession, table: Table, item_id: str, *, owner: str, now: float, ttl_s: float
) -> Lease | None:
    """Claim one named row (free or expired), or None when someone else holds it."""
    found = await claim(
        session, table, owner=owner, now=now, ttl_s=ttl_s, where=table.c.id == item_id
    )
    return found[0] if found else None


async def renew(
    session: AsyncSession, table: Table, lease: Lease, *, now: float, ttl_s: float
) -> Lease:
    """Extend a held lease; raises StaleLease if it was taken over."""
    c = table.c
    result = await session.execute(
        update(table)
        .where(c.id == lease.item_id, c.lock_token == lease.token)
        .values(lock_expires_at=now + ttl_s)
    )
    if _rowcount(result) != 1:
        _count_stale(lease.kind, lease.item_id, lease.owner, "renew")
        raise StaleLease(lease, "renew refused")
    return Lease(lease.kind, lease.item_id, lease.owner, lease.token, now + ttl_s)


async def release(session: AsyncSession, table: Table, lease: Lease) -> bool:
    """Give the row back (free at once); False if it was no longer ours."""
    c = table.c
    result = await session.execute(
        update(table)
        .where(c.id == lease.item_id, c.lock_token == lease.token)
        .values(lock_owner=None, lock_token=None, lock_expires_at=None)
    )
    return _rowcount(result) == 1


async def guard(
    session: AsyncSession,
    table: Table,
    lease: Lease,
    *,
    action: str,
    now: float,
    values: dict[str, Any] | None = None,
) -> bool:
    """Begin a guarded apply: ``UPDATE table SET values WHERE id AND lock_token``.

    True: the lease is ours; the row is locked until commit (PostgreSQL) and the action is
    audited. False: the lease is stale; the caller must roll back and drop its result.
    """
    c = table.c
    vals: dict[str, Any] = dict(values or {})
    if not vals:
        vals = {"lock_token": lease.token}  # a no-op write that takes the row lock
    result = await session.execute(
        update(table).where(c.id == lease.item_id, c.lock_token == lease.token).values(**vals)
    )
    if _rowcount(result) != 1:
        _count_stale(lease.kind, lease.item_id, lease.owner, action)
        return False
    audit(session, lease, action, now)
    return True


async def release_owned(session: AsyncSession, tables: list[Table], owner: str | None) -> int:
    """At start-up: free the leases a previous process left behind.

    `owner` None frees every lease (SQLite: the embedded coordinator is the only process, so
    whatever is leased belongs to a process that is gone); otherwise those of `owner` (a
    replica restarted under the same ``--replica-id``: none of its old work runs any more).
    """
    freed = 0
    for table in tables:
        stmt = update(table).where(table.c.lock_owner.is_not(None))
        if owner is not None:
            stmt = stmt.where(table.c.lock_owner == owner)
        freed += _rowcount(
            await session.execute(
                stmt.values(lock_owner=None, lock_token=None, lock_expires_at=None)
            )
        )
    t = _role_table()
    roles = update(t).where(t.c.owner != "")
    if owner is not None:
        roles = roles.where(t.c.owner == owner)
    freed += _rowcount(await session.execute(roles.values(owner="", token="", expires_at=0.0)))
    return freed


# ------------------------------------------------------------------------ role leases


def _role_table() -> Table:
    return cast(Table, RoleLease.__table__)


async def claim_role(
    session: AsyncSession, name: str, owner: str, now: float, ttl_s: float
) -> Lease | None:
    """Hold the role `name`: take it if free or expired, extend it if already ours.

    Returns the lease (same token while we keep holding it), or None if another owner
    holds it unexpired. Commit soon after.
    """
    t = _role_table()
    ins: Any = (postgresql.insert(t) if _is_postgresql(session) else sqlite.insert(t)).values(
        name=name, owner="", token="", expires_at=0.0
    )
    await session.execute(ins.on_conflict_do_nothing(index_elements=["name"]))
    ours = await session.execute(
        update(t)
        .where(t.c.name == name, t.c.owner == owner, t.c.expires_at >= now)
        .values(expires_at=now + ttl_s)
        .returning(t.c.token)
    )
    token = ours.scalar_one_or_none()
    if token is not None:
        return Lease(ROLE, name, owner, str(token), now + ttl_s)
    token = new_token()
    taken = await session.execute(
        update(t)
        .where(t.c.name == name, t.c.expires_at < now)
        .values(owner=owner, token=token, expires_at=now + ttl_s)
    )
    if _rowcount(taken) != 1:
        return None
    return Lease(ROLE, name, owner, token, now + ttl_s)


async def renew_role(session: AsyncSession, lease: Lease, *, now: float, ttl_s: float) -> Lease:
    t = _role_table()
    result = await session.execute(
        update(t)
        .where(t.c.name == lease.item_id, t.c.token == lease.token)
        .values(expires_at=now + ttl_s)
    )
    if _rowcount(result) != 1:
        _count_stale(ROLE, lease.item_id, lease.owner, "renew")
        raise StaleLease(lease, "renew refused")
    return Lease(ROLE, lease.item_id, lease.owner, lease.token, now + ttl_s)


async def live_roles(session: AsyncSession, names: list[str], now: float) -> set[str]:
    """Which of the roles ``names`` someone holds unexpired at ``now`` (bounded chunks)."""
    t = _role_table()
    live: set[str] = set()
    for start in range(0, len(names), 500):
        rows = await session.execute(
            select(t.c.name).where(
                t.c.name.in_(names[start : start + 500]), t.c.owner != "", t.c.expires_at >= now
            )
        )
        live.update(str(name) for name in rows.scalars())
    return live


async def purge_roles(session: AsyncSession, prefix: str, before: float) -> int:
    """Delete the roles named ``prefix…`` that expired before ``before`` (ids gone)."""
    t = _role_table()
    result = await session.execute(
        delete(t).where(t.c.name.startswith(prefix, autoescape=True), t.c.expires_at < before)
    )
    return _rowcount(result)


async def release_role(session: AsyncSession, lease: Lease) -> bool:
    t = _role_table()
    result = await session.execute(
        update(t)
        .where(t.c.name == lease.item_id, t.c.token == lease.token)
        .values(owner="", token="", expires_at=0.0)
    )
    return _rowcount(result) == 1


async def guard_role(
    session: AsyncSession,
    lease: Lease,
    *,
    action: str,
    item_id: str,
    now: float,
    record: bool = True,
) -> bool:
    """Begin an apply done under a role: the role row is locked until commit (PostgreSQL)
    and ``(role, item_id, action)`` audited (unless `record` is False: then call
    ``audit_role`` once the apply knows it did something). False: the role was taken over;
    roll back."""
    t = _role_table()
    result = await session.execute(
        update(t)
        .where(t.c.name == lease.item_id, t.c.token == lease.token)
        .values(token=lease.token)
    )
    if _rowcount(result) != 1:
        _count_stale(ROLE, lease.item_id, lease.owner, action)
        return False
    if record:
        audit_role(session, lease, action=action, item_id=item_id, now=now)
    return True


def audit_role(
    session: AsyncSession, lease: Lease, *, action: str, item_id: str, now: float
) -> None:
    """Record ``(role:<name>, item_id, action)`` in the apply's transaction."""
    session.add(
        LeaseAudit(
            kind=f"role:{lease.item_id}"[:32],
            item_id=item_id[:128],
            owner=lease.owner,
            token=lease.token,
            action=action[:64],
            at=now,
        )
    )


async def purge_audit(session: AsyncSession, before: float) -> int:
    """Forget audit rows older than `before` (the explorer sampler keeps a week)."""
    t = cast(Table, LeaseAudit.__table__)
    return _rowcount(await session.execute(delete(t).where(t.c.at < before)))


__all__ = [
    "Lease",
    "StaleLease",
    "audit",
    "audit_role",
    "claim",
    "claim_one",
    "claim_role",
    "guard",
    "guard_role",
    "purge_audit",
    "release",
    "release_owned",
    "release_role",
    "renew",
    "renew_role",
    "stale_applies",
]
