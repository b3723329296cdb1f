"""How replicas share one ledger sequencer: the role lease and the hand-off queue.

`LeasedRole` holds the ``ledger-sequencer`` role through `coordinator.leases` (claimed
when free or expired, renewed when a third of its lease has passed) and guards every
batch: the batch transaction starts by touching the role row with this holder's token
(`leases.guard_role`), so a holder that stalled past its lease and lost the role has its
batch rolled back instead of sealing beside the new holder.

`QueueHandoff` is the `ledger_queue` table (migration 0010): a replica without the role
inserts its transfers there (one multi-row INSERT per round, committed: durable from
then on), the holder claims pending rows inside its batch transaction (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL) and writes each row's answer — the sealed seq, or the refusal's
status, code and message — in that same transaction, so a row is answered exactly when
its transfer is (or is not) in the chain. The submitter polls its own rows, turns them
back into transactions or ServiceErrors and deletes them. Answers nobody collected (the
submitter died) are swept after an hour.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loom.coordinator import leases
from loom.coordinator.db.models import LedgerEntry, LedgerQueued, LedgerTransaction
from loom.coordinator.errors import BadRequest, Conflict, PaymentRequired, ServiceError
from loom.coordinator.services import ledger_privacy as privacy
from loom.coordinator.services import ledger_write as write
from loom.coordinator.services.ledger_sequencer import Sequencer
from loom.coordinator.services.ledger_write import Result, Transfer
from loom.core import ledger as core
from loom.core.ledger import Transaction

log = logging.getLogger(__name__)

ROLE = "ledger-sequencer"
ROLE_TTL_S = 10.0
#: answered rows older than this, never collected (their submitter died), are deleted
SWEEP_AFTER_S = 3600.0
_ID_CHUNK = 1000
_QUEUE = cast(Table, LedgerQueued.__table__)
_ERRORS: dict[int, type[ServiceError]] = {400: BadRequest, 402: PaymentRequired, 409: Conflict}


def _is_postgresql(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@dataclass
class LeasedRole:
    """The ledger's sequencer role, leased (several replicas on one database)."""

    sessions: async_sessionmaker[AsyncSession]
    owner: str
    ttl_s: float = ROLE_TTL_S
    name: str = ROLE
    lease: leases.Lease | None = None
    _next_try: float = 0.0

    async def held(self, now: float) -> bool:
        lease = self.lease
        if lease is not None and now < lease.expires_at - self.ttl_s * 2 / 3:
            return True
        if lease is None and now < self._next_try:
            return False
        async with self.sessions() as session:
            lease = await leases.claim_role(session, self.name, self.owner, now, self.ttl_s)
            await session.commit()
        if lease is None:
            if self.lease is not None:
                log.warning("ledger sequencer: %s lost the role", self.owner)
            self._next_try = now + self.ttl_s / 5
        elif self.lease is None:
            log.info("ledger sequencer: %s holds the role", self.owner)
        self.lease = lease
        return lease is not None

    async def guard(self, session: AsyncSession, now: float) -> bool:
        lease = self.lease
        if lease is None:
            return False
        ok = await leases.guard_role(
            session, lease, action="seal", item_id="batch", now=now, record=False
        )
        if not ok:
            self.lease = None
        return ok

    async def release(self) -> None:
        lease, self.lease = self.lease, None
        if lease is None:
            return
        async with self.sessions() as session:
            await leases.release_role(session, lease)
            await session.commit()


def _transfer(row: Any) -> Transfer | ServiceError:
    try:
        entries = [(str(a), int(m)) for a, m in json.loads(row.entries_json)]
        meta = json.loads(row.meta_json)
        if not isinstance(meta, dict):
            raise ValueError("meta is not an object")
        return Transfer.of(str(row.kind), str(row.idem_key), entries, meta)
    except (ValueError, TypeError) as exc:
        return BadRequest("invalid_transaction", f"unreadable handed-over transfer: {exc}")


@dataclass
class QueueHandoff:
    """The `ledger_queue` table as a `ledger_sequencer.Handoff`."""

    sessions: async_sessionmaker[AsyncSession]
    owner: str
    clock: Callable[[], float] = time.time
    _answers: int = field(default=0)

    async def claim(
        self, session: AsyncSession, limit: int
    ) -> list[tuple[int, Transfer | ServiceError]]:
        c = _QUEUE.c
        stmt = (
            select(c.id, c.kind, c.idem_key, c.entries_json, c.meta_json)
            .where(c.state == "pending")
            .order_by(c.id)
            .limit(limit)
        )
        if _is_postgresql(session):
            stmt = stmt.with_for_update(skip_locked=True)
        return [(int(row.id), _transfer(row)) for row in await session.execute(stmt)]

    async def answer(self, session: AsyncSession, results: Mapping[int, Result]) -> None:
        now = self.clock()
        rows = []
        for qid, result in results.items():
            values: tuple[str, int | None, int | None, str | None, str | None]
            if isinstance(result, ServiceError):
                values = ("refused", None, result.status, result.code, result.message)
            else:
                values = ("sealed", result.seq, None, None, None)
            state, seq, status, code, message = values
            rows.append(
                {"qid": qid, "st": state, "sq": seq, "ss": status, "cd": code, "ms": message}
            )
        if rows:
            c = _QUEUE.c
            await session.execute(
                update(_QUEUE)
                .where(c.id == bindparam("qid"))
                .values(
                    state=bindparam("st"),
                    seq=bindparam("sq"),
                    status=bindparam("ss"),
                    code=bindparam("cd"),
                    message=bindparam("ms"),
                    answered_at=now,
                ),
                rows,
            )
        self._answers += 1
        if self._answers % 200 == 1:
            await session.execute(
                delete(_QUEUE).where(
                    _QUEUE.c.state != "pending", _QUEUE.c.answered_at < now - SWEEP_AFTER_S
                )
            )

    async def hand_over(self, transfers: Sequence[Transfer], now: float) -> list[int]:
        rows = [
            {
                "submitted_by": self.owner,
                "submitted_at": now,
                "kind": t.kind,
                "idem_key": t.key,
                "entries_json": json.dumps([[a, m] for a, m in t.entries]),
                "meta_json": write.meta_text(t.meta),
                "state": "pending",
            }
            for t in transfers
        ]
        async with self.sessions() as session:
            result = await session.execute(
                insert(_QUEUE).returning(_QUEUE.c.id, sort_by_parameter_order=True), rows
            )
            ids = [int(i) for i in result.scalars()]
            await session.commit()
        return ids

    async def results(self, ids: Sequence[int]) -> dict[int, Result]:
        c = _QUEUE.c
        out: dict[int, Result] = {}
        async with self.sessions() as session:
            answered: list[Any] = []
            for i in range(0, len(ids), _ID_CHUNK):
                chunk = list(ids[i : i + _ID_CHUNK])
                answered.extend(
                    await session.execute(
                        select(c.id, c.state, c.seq, c.status, c.code, c.message).where(
                            c.id.in_(chunk), c.state != "pending"
                        )
                    )
                )
            if not answered:
                return out
            sealed = {int(r.seq) for r in answered if r.state == "sealed"}
            txns = await _transactions(session, sealed)
            for r in answered:
                if r.state == "sealed":
                    out[int(r.id)] = txns[int(r.seq)]
                else:
                    cls = _ERRORS.get(int(r.status or 400), BadRequest)
                    out[int(r.id)] = cls(str(r.code), str(r.message))
            done = list(out)
            for i in range(0, len(done), _ID_CHUNK):
                await session.execute(delete(_QUEUE).where(c.id.in_(done[i : i + _ID_CHUNK])))
            await session.commit()
        return out


async def _transactions(session: AsyncSession, seqs: set[int]) -> dict[int, Transaction]:
    """Sealed transactions by seq, under private names (one query each, chunked)."""
    out: dict[int, Transaction] = {}
    ordered = sorted(seqs)
    for i in range(0, len(ordered), _ID_CHUNK):
        chunk = ordered[i : i + _ID_CHUNK]
        rows = list(
            await session.execute(
                select(*write.TXN_COLUMNS).where(LedgerTransaction.seq.in_(chunk))
            )
        )
        entries: dict[int, list[tuple[str, int]]] = {}
        for seq, account, amount in await session.execute(
            select(LedgerEntry.txn_seq, LedgerEntry.account, LedgerEntry.amount_micro).where(
                LedgerEntry.txn_seq.in_(chunk)
            )
        ):
            entries.setdefault(int(seq), []).append((str(account), int(amount)))
        names = await privacy.private_names(
            session, [a for legs in entries.values() for a, _ in legs]
        )
        for row in rows:
            seq = int(row[0])
            legs = [(names.get(a, a), m) for a, m in entries.get(seq, ())]
            out[seq] = write.txn_of(row, core.canonical_entries(legs))
    return out


def sequencer_for(
    sessions: async_sessionmaker[AsyncSession], *, replicated: bool, owner: str
) -> Sequencer:
    """The coordinator's sequencer: leased role and hand-off queue with replicas, else the
    embedded single process (which seals everything itself)."""
    if not replicated:
        return Sequencer(sessions)
    return Sequencer(
        sessions, role=LeasedRole(sessions, owner), handoff=QueueHandoff(sessions, owner)
    )
