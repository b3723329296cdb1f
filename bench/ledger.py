"""Benchmark: the ledger in the database — the sequencer against today's path and the
database's own single-row insert rate, then `verify`.

Run: .venv/bin/python bench/ledger.py [--posts N] [--writers W] [--callers C] [--runs R]
     [--verify-count M] [--pg postgresql://postgres@127.0.0.1:5432/test] [--no-sqlite]

Per backend, in one fresh database, each figure the median of R runs:

* ``direct``: today's path — every transfer its own DB transaction through `ledger.post`
  (lock the head, idempotency lookup, balance check, seal, insert, update, commit), W
  concurrent writers (asyncio tasks, each with its own connection).
* ``sequencer``: C concurrent callers (asyncio tasks) each awaiting `Sequencer.submit`
  for its next transfer; the sequencer seals whatever is queued in one DB transaction.
* ``handed over``: the same through a second "replica" without the role (leased role and
  `ledger_queue` hand-off, two Sequencers in this process): what callers of a non-holder
  see, half as many transfers per run.
* ``insert``: the database's own rate for single-row INSERT transactions (one row, one
  commit each) from W concurrent connections of the bare driver (asyncpg / sqlite3),
  with no ORM: the ceiling for any design that commits every transfer on its own.

Transfers alternate deposit and hold over 100 users (as before); each caller posts a
deposit, awaits it, then the hold it pays for. Verify: `ledger.verify`
over the whole chain, seconds per 1,000,000 transactions extrapolated from M.
PostgreSQL runs in a fresh schema that is dropped afterwards; skipped if unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.services import ledger
from loom.coordinator.services.ledger_queue import ROLE_TTL_S, LeasedRole, QueueHandoff
from loom.coordinator.services.ledger_sequencer import Sequencer
from loom.coordinator.services.ledger_write import Transfer
from loom.core import ledger as core
from loom.core.money import MICRO

USERS = [f"{i:064x}" for i in range(1, 101)]
Sessions = async_sessionmaker[AsyncSession]


def _transfer(i: int, tag: str) -> Transfer:
    user = USERS[(i // 2) % len(USERS)]
    if i % 2 == 0:
        return Transfer.of(core.DEPOSIT, f"{tag}-{i}", core.deposit_entries(user, 10 * MICRO))
    return Transfer.of(core.HOLD, f"{tag}-{i}", core.hold_entries(user, f"c{tag}{i}", MICRO))


async def _direct(sessions: Sessions, posts: int, writers: int, tag: str) -> float:
    counter = iter(range(0, posts, 2))

    async def writer() -> None:
        for k in counter:  # a deposit, then the hold it pays for
            for t in (_transfer(k, tag), _transfer(k + 1, tag)):
                async with sessions() as s:
                    await ledger.post(s, t.kind, t.key, t.entries, t.meta, time.time())
                    await s.commit()

    t0 = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return posts / (time.perf_counter() - t0)


async def _sequenced(sessions: Sessions, posts: int, callers: int, tag: str) -> float:
    seq = Sequencer(sessions)
    seq.start()
    counter = iter(range(0, posts, 2))

    async def caller() -> None:
        for k in counter:  # a deposit, then the hold it pays for
            await seq.submit(_transfer(k, tag))
            await seq.submit(_transfer(k + 1, tag))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        rate = posts / (time.perf_counter() - t0)
    finally:
        await seq.stop()
    assert seq.stats.refused == 0, seq.stats
    return rate


async def _handed_over(sessions: Sessions, posts: int, callers: int, tag: str) -> float:
    """Two replicas in this process: A holds the role, B's callers hand over to it."""

    def replica(role: LeasedRole) -> Sequencer:
        return Sequencer(
            sessions, role=role, handoff=QueueHandoff(sessions, role.owner), poll_s=0.005
        )

    role_a = LeasedRole(sessions, f"{tag}-A")
    a, b = replica(role_a), replica(LeasedRole(sessions, f"{tag}-B"))
    # The role outlives each run's replicas: wait out a previous holder's lease if any.
    deadline = time.monotonic() + 2 * ROLE_TTL_S + 5
    while not await role_a.held(time.time()):
        assert time.monotonic() < deadline, "the role never came free"
        await asyncio.sleep(0.5)
        role_a._next_try = 0.0
    a.start()
    b.start()
    counter = iter(range(0, posts, 2))

    async def caller() -> None:
        for k in counter:
            await b.submit(_transfer(k, tag))
            await b.submit(_transfer(k + 1, tag))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        rate = posts / (time.perf_counter() - t0)
    finally:
        await b.stop()
        await a.stop()  # releases the role
    assert b.stats.handed_over == posts and a.stats.refused == 0, (a.stats, b.stats)
    return rate


async def _insert_pg(url: str, schema: str, rows: int, writers: int, tag: str) -> float:
    pool = await asyncpg.create_pool(
        url, min_size=writers, max_size=writers, server_settings={"search_path": schema}
    )
    assert pool is not None
    try:
        await pool.execute("CREATE TABLE IF NOT EXISTS bench_rows (id text PRIMARY KEY, v bigint)")
        counter = iter(range(rows))

        async def writer() -> None:
            async with pool.acquire() as conn:
                for i in counter:  # autocommit: one transaction per row
                    await conn.execute("INSERT INTO bench_rows VALUES ($1, $2)", f"{tag}{i}", i)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        return rows / (time.perf_counter() - t0)
    finally:
        await pool.close()


def _insert_sqlite(path: str, rows: int, tag: str) -> float:
    """One connection (SQLite has one writer), the coordinator's pragmas."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("CREATE TABLE IF NOT EXISTS bench_rows (id text PRIMARY KEY, v integer)")
        t0 = time.perf_counter()
        for i in range(rows):
            conn.execute("INSERT INTO bench_rows VALUES (?, ?)", (f"{tag}{i}", i))
        return rows / (time.perf_counter() - t0)
    finally:
        conn.close()


async def _fill(sessions: Sessions, target: int) -> None:
    """Top the chain up to ``target`` transactions through the sequencer (fast)."""
    async with sessions() as s:
        have = await ledger.count(s)
    seq = Sequencer(sessions)
    seq.start()
    try:
        user = iter(range(have, target))
        await asyncio.gather(
            *(
                seq.submit(
                    Transfer.of(
                        core.DEPOSIT,
                        f"fill-{i}",
                        core.deposit_entries(USERS[i % len(USERS)], MICRO),
                    )
                )
                for i in user
            )
        )
    finally:
        await seq.stop()


async def run(
    url: str, insert: Callable[[str], Awaitable[float]], args: argparse.Namespace
) -> dict[str, float]:
    engine = create_engine(url)
    await migrate(engine)
    sessions = session_factory(engine)
    figures: dict[str, list[float]] = {"direct": [], "sequencer": [], "insert": [], "handoff": []}
    try:
        for r in range(args.runs):
            figures["insert"].append(await insert(f"i{r}-"))
            figures["direct"].append(await _direct(sessions, args.posts, args.writers, f"d{r}"))
            figures["sequencer"].append(
                await _sequenced(sessions, args.seq_posts, args.callers, f"s{r}")
            )
            figures["handoff"].append(
                await _handed_over(sessions, args.seq_posts // 2, args.callers, f"h{r}")
            )
        await _fill(sessions, args.verify_count)
        async with sessions() as s:
            t0 = time.perf_counter()
            result = await ledger.verify(s)
            elapsed = time.perf_counter() - t0
        assert result.ok, result.failure
    finally:
        await engine.dispose()
    out = {k: statistics.median(v) for k, v in figures.items()}
    out["runs"] = len(figures["direct"])
    out["verify_count"] = result.count
    out["verify_s"] = elapsed
    out["verify_s_per_1m"] = elapsed / result.count * 1_000_000
    print(f"  {url.split('?')[0]}: { ({k: [round(x) for x in v] for k, v in figures.items()}) }")
    return out


async def _pg(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=1000, help="transfers per direct run")
    ap.add_argument("--seq-posts", type=int, default=10_000, help="transfers per sequencer run")
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--callers", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--verify-count", type=int, default=50_000)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--no-sqlite", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            raw = str(Path(tmp) / "rows.db")

            async def sqlite_insert(tag: str) -> float:
                return _insert_sqlite(raw, args.posts * 4, tag)

            results["sqlite"] = asyncio.run(run(url, sqlite_insert, args))
    schema = f"bench_{secrets.token_hex(4)}"
    try:
        asyncio.run(_pg(args.pg, f'CREATE SCHEMA "{schema}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"postgresql: skipped ({exc})")
    else:
        try:

            async def pg_insert(tag: str) -> float:
                return await _insert_pg(args.pg, schema, args.posts * 4, args.writers, tag)

            results["postgresql"] = asyncio.run(run(f"{args.pg}?schema={schema}", pg_insert, args))
        finally:
            asyncio.run(_pg(args.pg, f'DROP SCHEMA "{schema}" CASCADE'))
    print(
        f"direct: {args.posts} transfers per run, {args.writers} writers; sequencer: "
        f"{args.seq_posts} per run, {args.callers} callers; insert: {args.posts * 4} rows, "
        f"{args.writers} connections (SQLite: 1); medians of {args.runs} runs; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| backend | direct tx/s | sequencer tx/s | handed over tx/s | single-row inserts/s "
        "| sequencer / inserts | sequencer / direct | verify: txns | s per 1 M |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(
            f"| {name} | {r['direct']:.0f} | {r['sequencer']:.0f} | {r['handoff']:.0f} | "
            f"{r['insert']:.0f} | "
            f"{r['sequencer'] / r['insert']:.2f} | {r['sequencer'] / r['direct']:.1f} | "
            f"{int(r['verify_count']):,} | {r['verify_s_per_1m']:.0f} |"
        )


if __name__ == "__main__":
    main()
