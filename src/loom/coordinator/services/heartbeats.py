"""Heartbeats are applied in memory and written to the database in batches.

A million agents beating every 60 s is ~17,000 heartbeats/s (DESIGN.md §6): one
transaction per heartbeat would drown the database. `HeartbeatBuffer.record` is O(1)
and touches no I/O (it keeps the validated `Load`; only each node's latest one is turned
into JSON, at flush); `flush` writes every node's latest beat in one executemany.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, and_, bindparam, update
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.db.models import Node
from loom.coordinator.replicas import sessions
from loom.protocol.messages import Load


@dataclass(slots=True)
class _Pending:
    at: float
    count: int
    load: Load | str

    @property
    def load_json(self) -> str:
        return self.load if isinstance(self.load, str) else self.load.model_dump_json()


class HeartbeatBuffer:
    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self._last_seen: dict[str, float] = {}
        self.total = 0

    def record(self, node_id: str, at: float, load: Load | str) -> None:
        """One beat of ``node_id`` at ``at``; ``load`` is its Load (or that Load's JSON)."""
        self.total += 1
        self._last_seen[node_id] = at
        entry = self._pending.get(node_id)
        if entry is None:
            self._pending[node_id] = _Pending(at, 1, load)
        else:
            entry.at = at
            entry.count += 1
            entry.load = load

    def last_seen(self, node_id: str) -> float | None:
        return self._last_seen.get(node_id)

    def forget(self, node_id: str) -> None:
        self._last_seen.pop(node_id, None)

    def __len__(self) -> int:
        return len(self._pending)

    def take(self) -> dict[str, _Pending]:
        pending, self._pending = self._pending, {}
        return pending

    def restore(self, taken: dict[str, _Pending]) -> None:
        """Put back beats whose write failed; a node's newer beat keeps its time and load."""
        for node_id, old in taken.items():
            entry = self._pending.get(node_id)
            if entry is None:
                self._pending[node_id] = old
            else:
                entry.count += old.count

    async def flush(
        self, session: AsyncSession, fence: tuple[str, Mapping[str, int]] | None = None
    ) -> int:
        """Write and commit buffered heartbeats in one statement; returns how many nodes.

        If the write fails (pool timeout, database locked), the beats go back into the
        buffer for the next flush instead of being lost: a lost flush leaves
        `last_heartbeat_at` stale and the watchdog would take live nodes offline.

        ``fence`` = (this replica's id, node id → the session epoch it holds): each row is
        written only while the replica still holds that agent's session
        (``loom.coordinator.replicas.sessions``); beats of nodes not in the map, or whose
        session moved, change nothing (a stale replica's writes are refused).
        """
        pending = self.take()
        if fence is not None:
            pending = {n: p for n, p in pending.items() if n in fence[1]}
        if not pending:
            return 0
        table = cast(Table, Node.__table__)
        where = table.c.id == bindparam("b_id")
        if fence is not None:
            where = and_(where, sessions.held_by(table.c.id, fence[0], bindparam("b_epoch")))
        stmt = (
            update(table)
            .where(where)
            .values(
                last_heartbeat_at=bindparam("b_at"),
                heartbeats=table.c.heartbeats + bindparam("b_n"),
                load_json=bindparam("b_load"),
            )
        )
        epochs: Mapping[str, int] = fence[1] if fence is not None else {}
        rows = [
            {"b_id": node_id, "b_at": p.at, "b_n": p.count, "b_load": p.load_json}
            | ({"b_epoch": epochs[node_id]} if fence is not None else {})
            for node_id, p in sorted(pending.items())  # id order, as every multi-row writer
        ]
        try:
            conn = await session.connection()
            await conn.execute(stmt, rows)
            if fence is not None:
                await sessions.touch_many(
                    session, fence[0], {n: (epochs[n], p.at) for n, p in sorted(pending.items())}
                )
            await session.commit()
        except BaseException:
            self.restore(pending)
            raise
        return len(rows)
