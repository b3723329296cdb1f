"""Benchmark: build and verify_chain over 1,000,000 ledger transactions, in memory.

Run: .venv/bin/python bench/ledger_core.py [N]
The workload cycles deposit -> hold -> settle (2 suppliers, 10 % fee) -> refund -> payout
over 1,000 users, 100 suppliers and a fresh cluster per cycle, so balances, escrow owners
and idempotency keys grow as they would in a real history.
"""

from __future__ import annotations

import gc
import sys
import time

from loom.core import ledger as lg
from loom.core import ledger_verify as lv
from loom.core.money import MICRO

USERS = [f"{i:064x}" for i in range(1, 1001)]
SUPPLIERS = [f"{i:064x}" for i in range(10_001, 10_101)]
FEE_BPS = 1000


def build(n: int) -> list[lg.Transaction]:
    txns: list[lg.Transaction] = []
    prev: lg.Transaction | None = None
    meta_settle = lg.settle_meta(FEE_BPS)
    cycle = 0
    while len(txns) < n:
        user = USERS[cycle % len(USERS)]
        s1 = SUPPLIERS[cycle % len(SUPPLIERS)]
        s2 = SUPPLIERS[(cycle + 1) % len(SUPPLIERS)]
        cluster = f"c{cycle}"
        steps: list[tuple[str, tuple[lg.Entry, ...], dict[str, str]]] = [
            (lg.DEPOSIT, lg.deposit_entries(user, 100 * MICRO), {}),
            (lg.HOLD, lg.hold_entries(user, cluster, 60 * MICRO), {}),
            (
                lg.SETTLE,
                lg.settle_entries(cluster, {s1: 25 * MICRO, s2: 25 * MICRO + 7}, FEE_BPS),
                meta_settle,
            ),
            (lg.REFUND, lg.refund_entries(cluster, user, 10 * MICRO - 7), {}),
            (lg.PAYOUT, lg.payout_entries(s1, "bank", 20 * MICRO), {}),
        ]
        for kind, entries, meta in steps:
            if len(txns) >= n:
                break
            seq = len(txns) + 1
            prev = lg.build_transaction(
                prev, seq, kind, f"{kind}-{seq}", entries, meta, 1_790_000_000_000_000 + seq
            )
            txns.append(prev)
        cycle += 1
    return txns


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    t0 = time.perf_counter()
    txns = build(n)
    t_build = time.perf_counter() - t0
    # Keep the cyclic GC from rescanning the million live transactions on every pass: a real
    # verifier streams them from the database and never holds them all at once.
    gc.freeze()
    t0 = time.perf_counter()
    report = lv.verify_chain(txns)
    t_verify = time.perf_counter() - t0
    assert report.ok, report.failure
    assert report.count == n
    assert sum(report.balances.values()) == 0
    t0 = time.perf_counter()
    report_nokeys = lv.verify_chain(txns, check_keys=False)
    t_verify_nokeys = time.perf_counter() - t0
    assert report_nokeys.ok
    per_m = 1_000_000 / n
    print(f"transactions: {n:,}")
    print(f"build (validate + hash): {n / t_build:,.0f} txns/s, {t_build * per_m:.1f} s per 1M")
    print(f"verify_chain:            {n / t_verify:,.0f} txns/s, {t_verify * per_m:.1f} s per 1M")
    print(
        f"verify_chain (no keys):  {n / t_verify_nokeys:,.0f} txns/s, "
        f"{t_verify_nokeys * per_m:.1f} s per 1M"
    )
    print(f"accounts: {len(report.balances):,}; head: {report.head_hash[:16]}…")


if __name__ == "__main__":
    main()
