"""One sequencer per ledger: transfers sealed in batches, callers await their seal (issue 11 §6).

Posting one transfer per DB transaction costs ~10 round trips behind the head-row lock,
so the ledger moved 100–150 transfers/s whatever the number of callers. The sequencer
turns that around: callers `submit` a transfer and await a future; one task takes
everything submitted so far (up to `max_batch`) and appends it in **one** DB transaction
through `ledger_write.seal` — a fixed number of statements per batch — then resolves each
caller's future with its transaction or its refusal. A refused transfer (insufficient
funds, a key reused for a different movement, a malformed movement) fails only itself;
the chain, the idempotency keys and the balances are exactly what posting the accepted
transfers one by one would have produced (`loom.core.ledger_batch`). A batch is one DB
transaction, so a crash mid-batch leaves nothing half-written: the whole batch is there or
none of it, and its callers (who got no answer) retry with the same idempotency keys.

**The role.** With several replicas only one sequences at a time: the holder of the
leased role ``ledger-sequencer`` (`Role`: `ledger_queue.LeasedRole` is backed by
`coordinator.leases`; `SoleRole` is the embedded single process). Each batch transaction
begins with the role's guard (the holder's token on the role row), so a holder that
stalled past its lease has its batch rolled back. Correctness does not even depend on
that: every batch — and every `ledger.post` that must commit with other state
(settlement's metering rows, a cluster's hold) — locks the same head row first, so two
appenders can only take turns. The role decides who drains the hand-off queue, so that
replicas do not take turns on one lock.

**Hand-off.** A replica that does not hold the role hands its transfers over through a
`Handoff` — `ledger_queue.QueueHandoff`: a table of pending transfers the holder claims
with ``FOR UPDATE SKIP LOCKED`` inside its batch transaction and answers in the same
transaction (sealed seq, or the refusal), which the submitting replica polls for its own
rows. The table is the simplest design that is sound on PostgreSQL alone: a handed-over
transfer is durable the moment it is queued, survives the death of either replica (the
next holder seals it), and needs no second system; NATS would save the poll's latency but
add a second place where a transfer could be lost. Without a hand-off (no queue), a
replica that lost the role seals its own batches on the head lock, which stays correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loom.coordinator.errors import ServiceError
from loom.coordinator.services import ledger_write as write
from loom.coordinator.services.ledger_write import Result, Transfer
from loom.core.ledger import Entry, Transaction

log = logging.getLogger(__name__)

DEFAULT_BATCH = 500


class Unavailable(ServiceError):
    status = 503


def unavailable(why: str) -> Unavailable:
    return Unavailable(
        "ledger_unavailable",
        f"the ledger could not record the transfer ({why}); retry with the same idempotency key",
    )


class Role(Protocol):
    """Whether this process holds the ledger's sequencer role at ``now`` (claims/renews)."""

    async def held(self, now: float) -> bool: ...

    async def guard(self, session: AsyncSession, now: float) -> bool:
        """First statement of a batch transaction: False (roll back) if the role was lost."""
        ...

    async def release(self) -> None: ...


class SoleRole:
    """The embedded coordinator: one process, always the sequencer."""

    async def held(self, now: float) -> bool:
        return True

    async def guard(self, session: AsyncSession, now: float) -> bool:
        return True

    async def release(self) -> None:
        return None


class Handoff(Protocol):
    """How a non-holder's transfers reach the holder, and their results come back."""

    async def claim(
        self, session: AsyncSession, limit: int
    ) -> list[tuple[int, Transfer | ServiceError]]:
        """(holder, inside its batch transaction) pending hand-offs, locked for this batch."""
        ...

    async def answer(self, session: AsyncSession, results: Mapping[int, Result]) -> None:
        """(holder, same transaction) record each claimed hand-off's result."""
        ...

    async def hand_over(self, transfers: Sequence[Transfer], now: float) -> list[int]:
        """(non-holder) queue transfers durably; their ids."""
        ...

    async def results(self, ids: Sequence[int]) -> dict[int, Result]:
        """(submitter) the results known so far for ``ids`` (answered rows are removed)."""
        ...


@dataclass
class _Pending:
    transfer: Transfer
    future: asyncio.Future[Transaction]


@dataclass
class SequencerStats:
    batches: int = 0
    sealed: int = 0
    refused: int = 0
    handed_over: int = 0
    largest_batch: int = 0
    failures: int = 0
    holder_since: float | None = None


def _settle(future: asyncio.Future[Transaction], result: Result | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


@dataclass
class Sequencer:
    """The ledger's sequencer in this process. `start` it, `submit` transfers, `stop` it.

    `step` does one round (for tests that drive it with their own clock): as the holder,
    seal one batch of local and handed-over transfers; otherwise hand local transfers
    over; either way collect the answers to this process's hand-offs.
    """

    sessions: async_sessionmaker[AsyncSession]
    role: Role = field(default_factory=SoleRole)
    handoff: Handoff | None = None
    clock: Callable[[], float] = time.time
    max_batch: int = DEFAULT_BATCH
    #: how often a non-holder polls for answers, and idle rounds re-check the role
    poll_s: float = 0.02
    stats: SequencerStats = field(default_factory=SequencerStats)
    _local: list[_Pending] = field(default_factory=list)
    _waiting: dict[int, asyncio.Future[Transaction]] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= write.MAX_BATCH:
            raise ValueError(f"max_batch must be 1..{write.MAX_BATCH}, got {self.max_batch}")

    # ----------------------------------------------------------------- callers

    async def submit(self, transfer: Transfer) -> Transaction:
        """Queue ``transfer`` and wait for its seal; raises its refusal (a ServiceError)."""
        future: asyncio.Future[Transaction] = asyncio.get_running_loop().create_future()
        self._local.append(_Pending(transfer, future))
        self._wake.set()
        # A cancelled caller (which cancels the future) does not withdraw the transfer: it
        # is still sealed, and a retry with the same key finds it.
        return await future

    async def post(
        self,
        kind: str,
        key: str,
        entries: Iterable[Entry | tuple[str, int]],
        meta: Mapping[str, str] | None,
    ) -> Transaction:
        """`ledger.post`'s signature, sealed by the sequencer (its own DB transaction)."""
        return await self.submit(Transfer.of(kind, key, entries, meta))

    @property
    def backlog(self) -> int:
        return len(self._local) + len(self._waiting)

    # ----------------------------------------------------------------- the loop

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="ledger-sequencer")
        return self._task

    async def stop(self) -> None:
        """Stop the loop; transfers still queued here fail with 503 (nothing was written)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pending in self._local:
            _settle(pending.future, unavailable("the coordinator is shutting down"))
        self._local.clear()
        for future in self._waiting.values():
            _settle(future, unavailable("the coordinator is shutting down"))
        self._waiting.clear()
        try:
            await self.role.release()
        except Exception:
            log.exception("ledger sequencer: releasing the role failed")

    async def run(self) -> None:
        while True:
            try:
                worked = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.failures += 1
                log.exception("ledger sequencer: step failed")
                worked = False
                await asyncio.sleep(self.poll_s * 5)
            holder = self.stats.holder_since is not None
            if self._local or (worked and holder and self.handoff is not None):
                continue  # more queued here, or the hand-off queue may hold more
            self._wake.clear()
            if self._local:
                continue
            # A holder with a hand-off polls the queue, a submitter its answers, every
            # poll_s; a new local transfer wakes the loop at once.
            polling = self._waiting or (holder and self.handoff is not None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s if polling else 1.0)

    async def step(self) -> bool:
        """One round; True when it sealed, handed over or answered something."""
        now = self.clock()
        worked = False
        if await self.role.held(now):
            if self.stats.holder_since is None:
                self.stats.holder_since = now
            worked = await self._seal_batch(now, guarded=True)
        else:
            self.stats.holder_since = None
            if self.handoff is None:
                worked = await self._seal_batch(now, guarded=False)  # correct: the head lock
            elif self._local:
                worked = await self._hand_over(now)
        if self._waiting and self.handoff is not None:
            worked = await self._collect() or worked
        return worked

    def _take(self) -> list[_Pending]:
        """The next local transfers: at most `max_batch`, and `write.MAX_LEGS` entries."""
        n = legs = 0
        for pending in self._local:
            legs += len(pending.transfer.entries)
            if n >= self.max_batch or (n and legs > write.MAX_LEGS):
                break
            n += 1
        taken, self._local = self._local[:n], self._local[n:]
        return taken

    async def _seal_batch(self, now: float, *, guarded: bool) -> bool:
        local = self._take()
        try:
            async with self.sessions() as session:
                if guarded and not await self.role.guard(session, now):
                    self._local[:0] = local  # the role moved on: hand them over next round
                    return False
                claimed: list[tuple[int, Transfer | ServiceError]] = []
                if self.handoff is not None and len(local) < self.max_batch:
                    claimed = await self.handoff.claim(session, self.max_batch - len(local))
                if not local and not claimed:
                    return False
                # Claimed rows beyond the batch's entry budget stay pending (unlocked at
                # commit) for the next batch.
                legs = sum(len(p.transfer.entries) for p in local)
                for n, (_, t) in enumerate(claimed):
                    legs += len(t.entries) if isinstance(t, Transfer) else 0
                    if legs > write.MAX_LEGS and (local or n):
                        claimed = claimed[:n]
                        break
                transfers = [p.transfer for p in local] + [
                    t for _, t in claimed if isinstance(t, Transfer)
                ]
                results = iter(await write.seal(session, transfers, now) if transfers else [])
                mine = [next(results) for _ in local]
                answers: dict[int, Result] = {
                    qid: t if isinstance(t, ServiceError) else next(results) for qid, t in claimed
                }
                if claimed:
                    assert self.handoff is not None
                    await self.handoff.answer(session, answers)
                await session.commit()
        except Exception as exc:
            # Nothing of the batch was written (one DB transaction): tell its callers.
            self.stats.failures += 1
            log.warning("ledger sequencer: batch of %d failed: %r", len(local), exc)
            for pending in local:
                _settle(pending.future, unavailable(type(exc).__name__))
            return bool(local)
        size = len(transfers)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, size)
        every = mine + list(answers.values())
        refused = sum(1 for r in every if isinstance(r, ServiceError))
        self.stats.refused += refused
        self.stats.sealed += len(every) - refused
        for pending, result in zip(local, mine, strict=True):
            _settle(pending.future, result)
        return True

    async def _hand_over(self, now: float) -> bool:
        assert self.handoff is not None
        local = self._take()
        try:
            ids = await self.handoff.hand_over([p.transfer for p in local], now)
        except Exception as exc:
            self.stats.failures += 1
            log.warning("ledger sequencer: hand-off of %d failed: %r", len(local), exc)
            for pending in local:
                _settle(pending.future, unavailable(type(exc).__name__))
            return True
        self.stats.handed_over += len(local)
        for qid, pending in zip(ids, local, strict=True):
            self._waiting[qid] = pending.future
        return True

    async def _collect(self) -> bool:
        assert self.handoff is not None
        answered = await self.handoff.results(list(self._waiting))
        for qid, result in answered.items():
            future = self._waiting.pop(qid, None)
            if future is not None:
                _settle(future, result)
        return bool(answered)
