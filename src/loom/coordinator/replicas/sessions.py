"""Agent sessions: which replica holds each agent's WebSocket, fenced by an epoch.

Every (re)connect *claims* the session: one atomic upsert that bumps ``epoch`` and records
the replica (``INSERT … ON CONFLICT DO UPDATE … RETURNING epoch``; PostgreSQL locks the
row, SQLite has one writer). The replica keeps the epoch on the connection; every write it
makes on the agent's behalf is guarded by ``epoch = :mine AND replica_id = :me``. A replica
whose guarded write touches no row is *stale* (the agent reconnected elsewhere while this
replica was partitioned or slow): it drops the write and closes its socket.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from sqlalchemy import (
    ColumnElement,
    Executable,
    Select,
    Table,
    and_,
    bindparam,
    exists,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import BindParameter

from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import AgentSession

TABLE = cast(Table, AgentSession.__table__)


@dataclass(frozen=True)
class Holder:
    node_id: str
    replica_id: str
    epoch: int
    last_seen: float


async def claim(
    session: AsyncSession, node_id: str, replica_id: str, now: float, address: str = ""
) -> int:
    """Record that ``replica_id`` now holds ``node_id``'s socket; returns the new epoch
    (1 on the first connect). Joins the caller's transaction (commit it)."""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    params = {"c_node": node_id, "c_replica": replica_id, "c_now": now, "c_address": address}
    return int((await session.execute(_claim_statement(dialect), params)).scalar_one())


_CLAIMS: dict[str, Executable] = {}


def _claim_statement(dialect: str) -> Executable:
    """The claim's upsert, built once per dialect (every handshake runs it: building and
    caching-keying a fresh construct each time cost more than executing it)."""
    stmt = _CLAIMS.get(dialect)
    if stmt is None:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        ins = insert(TABLE).values(
            node_id=bindparam("c_node"),
            replica_id=bindparam("c_replica"),
            epoch=1,
            connected_at=bindparam("c_now"),
            last_seen=bindparam("c_now"),
            address=bindparam("c_address"),
        )
        stmt = _CLAIMS[dialect] = ins.on_conflict_do_update(
            index_elements=[TABLE.c.node_id],
            set_={
                "epoch": TABLE.c.epoch + 1,
                "replica_id": ins.excluded.replica_id,
                "connected_at": ins.excluded.connected_at,
                "last_seen": ins.excluded.last_seen,
                "address": ins.excluded.address,
            },
        ).returning(TABLE.c.epoch)
    return stmt


def held_by(
    node_id: ColumnElement[str] | BindParameter[str] | str,
    replica_id: str,
    epoch: ColumnElement[int] | BindParameter[int] | int,
) -> ColumnElement[bool]:
    """A WHERE clause for a guarded write: ``replica_id`` still holds ``node_id`` at
    ``epoch`` (columns, bind parameters for an executemany, or values)."""
    return exists().where(
        TABLE.c.node_id == node_id, TABLE.c.replica_id == replica_id, TABLE.c.epoch == epoch
    )


async def holds(session: AsyncSession, node_id: str, replica_id: str, epoch: int) -> bool:
    row = await session.execute(select(held_by(node_id, replica_id, epoch)))
    return bool(row.scalar())


async def touch(
    session: AsyncSession, node_id: str, replica_id: str, epoch: int, now: float
) -> bool:
    """Guarded ``last_seen = now``; False if this replica no longer holds the session."""
    result = await session.execute(
        update(TABLE)
        .where(TABLE.c.node_id == node_id, TABLE.c.replica_id == replica_id, TABLE.c.epoch == epoch)
        .values(last_seen=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def unchanged(session: AsyncSession, node_id: str, epoch: int) -> bool:
    """Lock ``node_id``'s session row if it is still at ``epoch`` (for a write that must
    not race a reconnect, e.g. the watchdog's offline transition); False if it moved."""
    result = await session.execute(
        update(TABLE)
        .where(TABLE.c.node_id == node_id, TABLE.c.epoch == epoch)
        .values(epoch=TABLE.c.epoch)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def in_grace(
    held: Holder,
    replica_id: str,
    last_beat: float | None,
    now: float,
    timeout_s: float,
    grace_s: float,
) -> bool:
    """The watchdog's per-session grace: an agent whose socket *another* replica held may
    be reconnecting to a third one after that replica died (capped backoff): it is not
    judged until ``timeout + grace`` after the last sign of it."""
    if held.replica_id == replica_id:
        return False
    last = max(last_beat or 0.0, held.last_seen)
    return now - last < timeout_s + grace_s


def held_here(replica_id: str) -> Select[tuple[str]]:
    """A subquery of the node ids whose session ``replica_id`` holds."""
    return select(TABLE.c.node_id).where(TABLE.c.replica_id == replica_id)


async def holders(session: AsyncSession, node_ids: Iterable[str]) -> dict[str, Holder]:
    """The session of each of ``node_ids`` that has one (in bounded chunks)."""
    out: dict[str, Holder] = {}
    for chunk in chunks(node_ids):
        rows = await session.execute(
            select(TABLE.c.node_id, TABLE.c.replica_id, TABLE.c.epoch, TABLE.c.last_seen).where(
                TABLE.c.node_id.in_(chunk)
            )
        )
        for node_id, replica_id, epoch, last_seen in rows:
            out[node_id] = Holder(node_id, replica_id, int(epoch), float(last_seen))
    return out


async def holder(session: AsyncSession, node_id: str) -> Holder | None:
    return (await holders(session, [node_id])).get(node_id)


async def stale_among(
    session: AsyncSession, replica_id: str, epochs: Mapping[str, int]
) -> set[str]:
    """Which of this replica's sessions (node id → the epoch it holds) were taken over."""
    current = await holders(session, epochs)
    stale: set[str] = set()
    for node_id, epoch in epochs.items():
        held = current.get(node_id)
        if held is None or held.replica_id != replica_id or held.epoch != epoch:
            stale.add(node_id)
    return stale


async def touch_many(
    session: AsyncSession, replica_id: str, seen: Mapping[str, tuple[int, float]]
) -> None:
    """Guarded ``last_seen`` for many sessions in one executemany (node → (epoch, at))."""
    if not seen:
        return
    stmt = (
        update(TABLE)
        .where(
            and_(
                TABLE.c.node_id == bindparam("s_id"),
                TABLE.c.replica_id == replica_id,
                TABLE.c.epoch == bindparam("s_epoch"),
            )
        )
        .values(last_seen=bindparam("s_at"))
    )
    rows = [{"s_id": n, "s_epoch": e, "s_at": at} for n, (e, at) in seen.items()]
    conn = await session.connection()
    await conn.execute(stmt, rows)
