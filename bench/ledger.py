"""Benchmark: the ledger in the database, through `services.ledger.post` and `verify`.

Run: .venv/bin/python bench/ledger.py [--posts N] [--writers W] [--verify-count M]
     [--pg postgresql://postgres@127.0.0.1:5432/test]

Transfers per second: each post is its own DB transaction (lock head, idempotency lookup,
balance check, seal, insert transaction + entries, update balances and head, commit),
alternating deposit and hold over 100 users, with one writer and with W concurrent
writers (asyncio tasks, each with its own connection). Verify: `services.ledger.verify`
over the whole chain from the database (streamed, hash chain + balances cache + head),
reported as seconds per 1,000,000 transactions extrapolated from M transactions.
PostgreSQL runs in a fresh schema that is dropped afterwards; skipped if unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path

import asyncpg

from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.services import ledger
from loom.core import ledger as core
from loom.core.money import MICRO

USERS = [f"{i:064x}" for i in range(1, 101)]


async def _post(sessions: object, i: int, tag: str) -> None:
    user = USERS[(i // 2) % len(USERS)]
    async with sessions() as s:  # type: ignore[operator]
        if i % 2 == 0:
            kind, entries = core.DEPOSIT, core.deposit_entries(user, 10 * MICRO)
        else:
            kind, entries = core.HOLD, core.hold_entries(user, f"c{tag}{i}", MICRO)
        await ledger.post(s, kind, f"{tag}-{i}", entries, {}, time.time())
        await s.commit()


async def run(url: str, posts: int, writers: int, verify_count: int) -> dict[str, float]:
    engine = create_engine(url)
    await migrate(engine)
    sessions = session_factory(engine)
    out: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        for i in range(posts):
            await _post(sessions, i, "a")
        out["single_tps"] = posts / (time.perf_counter() - t0)

        per = posts // writers

        async def writer(w: int) -> None:
            for i in range(per):
                await _post(sessions, i, f"w{w}")

        t0 = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        out["concurrent_tps"] = per * writers / (time.perf_counter() - t0)

        async with sessions() as s:
            have = await ledger.count(s)
        i = 0
        while have < verify_count:  # fill up to verify_count, in batches of 500 per commit
            async with sessions() as s:
                for _ in range(min(500, verify_count - have)):
                    user = USERS[i % len(USERS)]
                    entries = core.deposit_entries(user, MICRO)
                    await ledger.post(s, core.DEPOSIT, f"f-{i}", entries, {}, time.time())
                    i += 1
                    have += 1
                await s.commit()
        async with sessions() as s:
            t0 = time.perf_counter()
            result = await ledger.verify(s)
            elapsed = time.perf_counter() - t0
        assert result.ok, result.failure
        out["verify_count"] = result.count
        out["verify_s"] = elapsed
        out["verify_s_per_1m"] = elapsed / result.count * 1_000_000
    finally:
        await engine.dispose()
    return out


async def _pg(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=2000)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--verify-count", type=int, default=50_000)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        results["sqlite"] = asyncio.run(run(url, args.posts, args.writers, args.verify_count))
    schema = f"bench_{secrets.token_hex(4)}"
    try:
        asyncio.run(_pg(args.pg, f'CREATE SCHEMA "{schema}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"postgresql: skipped ({exc})")
    else:
        try:
            pg_url = f"{args.pg}?schema={schema}"
            results["postgresql"] = asyncio.run(
                run(pg_url, args.posts, args.writers, args.verify_count)
            )
        finally:
            asyncio.run(_pg(args.pg, f'DROP SCHEMA "{schema}" CASCADE'))
    print(f"posts {args.posts} per run, {args.writers} concurrent writers")
    print("| backend | 1 writer tx/s | 4 writers tx/s | verify: txns | verify s | s per 1 M |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(
            f"| {name} | {r['single_tps']:.0f} | {r['concurrent_tps']:.0f} | "
            f"{int(r['verify_count']):,} | {r['verify_s']:.2f} | {r['verify_s_per_1m']:.0f} |"
        )


if __name__ == "__main__":
    main()
