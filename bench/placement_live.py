"""Benchmark: placement per cluster request inside a running coordinator (issue 11 §5).

Run: .venv/bin/python bench/placement_live.py [--db URL] [--devices 100000] [--requests 300]
     [--before 5] [--record]

A PostgreSQL URL runs in a fresh schema (``?schema=NAME`` is dropped and re-created; without
one a throwaway schema is made), dropped at the end.

A real coordinator (``create_app`` under uvicorn, its background loops running) on a real
database (SQLite file by default, or ``--db postgresql://…``) holding ``--devices`` GPU devices
written in bulk before start (``tests/support/supply.py``: nodes of 1, 2, 4 or 8 GPUs of one
of 8 models, 6 regions, one CPU device each). Its placement index loads them at start-up (the
figure "load s"). Agents' WebSockets are not opened (100,000 agents do not fit this machine):
the index's presence view is a set holding every node, and requests pass the same set as
``connected``; everything else is the production path. Each request is
``services.clusters.create_cluster`` (place, reserve with the conditional UPDATE, commit) run on
the coordinator's event loop, 1..8 nodes of 1..2 models, a third pinned to a region, a third
with a price cap; successful ones hold their devices, so supply drains and every reservation's
events re-read nodes into the index. "placement" is the ``placement_s`` the coordinator
records per cluster (its ``timings_json``); "reserve" the reservation (conditional UPDATEs,
members, escrow hold) up to the commit; "request" the whole call, commit included.
"after" uses the long-lived index; "before" is the same request with ``index=None`` (an
index and scores loaded from the database for the request, as every request paid before
issue 11 §5), measured in the same run on the same data (``--before`` requests).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from loom.client.sdk import LoomClient
from loom.coordinator.config import Settings
from loom.coordinator.db.engine import create_engine, migrate, session_factory
from loom.coordinator.errors import Conflict
from loom.coordinator.services import clusters as cluster_service
from loom.core.spec import parse_spec
from loom.protocol.identity import KeyPair
from support.servers import CoordinatorThread, free_port
from support.supply import MODELS, REGIONS, insert_supply

RESULTS = Path(__file__).with_name("RESULTS.md")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def random_spec(rng: random.Random, i: int) -> dict[str, Any]:
    models = rng.sample(MODELS, rng.choice((1, 1, 2)))
    spec: dict[str, Any] = {
        "name": f"b{i}",
        "nodes": rng.randint(1, 8),
        "resources": {"gpu": models},
        "duration": "10m",
    }
    roll = rng.random()
    if roll < 0.33:
        spec["regions"] = [rng.choice(REGIONS)]
    elif roll < 0.66:
        spec["max_price"] = str(round(rng.uniform(0.5, 2.5), 2))
    return spec


async def _pg(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """``url`` itself for SQLite; for PostgreSQL, ``url`` in a schema of its own, empty."""
    if not url.startswith("postgres"):
        yield url
        return
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", None) or f"plbench_{secrets.token_hex(4)}"
    base = urlunsplit(parts._replace(query=urlencode(query)))
    asyncio.run(_pg(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; CREATE SCHEMA "{schema}"'))
    try:
        yield urlunsplit(parts._replace(query=urlencode({**query, "schema": schema})))
    finally:
        asyncio.run(_pg(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


async def prepare(url: str, devices: int) -> tuple[frozenset[str], int, float]:
    engine = create_engine(url)
    await migrate(engine)
    t = time.perf_counter()
    supply = await insert_supply(session_factory(engine), devices)
    took = time.perf_counter() - t
    await engine.dispose()
    return frozenset(supply.node_ids), supply.devices, took


def start(server: CoordinatorThread, timeout: float = 600) -> None:
    """``server.start()`` with room for loading 100,000 devices on a loaded machine (the
    test helper allows 30 s)."""
    server.thread.start()
    deadline = time.monotonic() + timeout
    while not server.server.started:
        if not server.thread.is_alive():
            raise RuntimeError("coordinator thread died during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"coordinator did not start within {timeout:.0f} s")
        time.sleep(0.05)


def run(url: str, devices: int, requests: int, before: int, seed: int) -> dict[str, Any]:
    everyone, rows, insert_s = asyncio.run(prepare(url, devices))
    settings = Settings(db_url=url, port=free_port(), faucet=True, tune_gc=True)
    server = CoordinatorThread(settings)
    state = server.state
    assert state.placement is not None
    state.placement.presence = everyone  # the agents' sockets, simulated (see docstring)
    t = time.perf_counter()
    start(server)  # the lifespan loads the index before serving
    load_s = time.perf_counter() - t
    owner = KeyPair.generate()
    with LoomClient(server.url, owner) as client:
        for _ in range(5):
            client.request("POST", "/v1/credits/deposit", json={"amount": "100000"})
    rng = random.Random(seed)

    async def one(spec: dict[str, Any], use_index: bool) -> tuple[float, float, float, bool]:
        parsed = parse_spec(spec)
        t0 = time.perf_counter()
        async with state.sessions() as session:
            try:
                cluster = await cluster_service.create_cluster(
                    session,
                    owner.public_hex,
                    parsed,
                    time.time(),
                    connected=everyone,
                    require_verified=True,
                    index=state.placement if use_index else None,
                )
            except Conflict:
                took = (time.perf_counter() - t0) * 1000
                return took, 0.0, took, False
        total = (time.perf_counter() - t0) * 1000
        timings = json.loads(cluster.timings_json)
        return timings["placement_s"] * 1000, timings["reserve_s"] * 1000, total, True

    def measure(n: int, use_index: bool, offset: int) -> dict[str, Any]:
        place_ms: list[float] = []
        reserve_ms: list[float] = []
        total_ms: list[float] = []
        ok = 0
        for i in range(n):
            placed, reserved, total, success = server.run_coro(
                one(random_spec(rng, offset + i), use_index), timeout=600
            )
            place_ms.append(placed)
            total_ms.append(total)
            if success:
                reserve_ms.append(reserved)
            ok += success
        return {
            "n": n,
            "ok": ok,
            "p50": statistics.median(place_ms),
            "p99": pct(place_ms, 0.99),
            "max": max(place_ms),
            "res_p50": statistics.median(reserve_ms) if reserve_ms else 0.0,
            "res_p99": pct(reserve_ms, 0.99),
            "req_p50": statistics.median(total_ms),
            "req_p99": pct(total_ms, 0.99),
        }

    try:
        after = measure(requests, True, 0)
        before_row = measure(before, False, requests) if before else None
        index = state.placement
        t = time.perf_counter()
        repaired = server.run_coro(index.resync(), timeout=600)
        resync_s = time.perf_counter() - t
    finally:
        server.stop()
    return {
        "db": "postgresql" if url.startswith("postgres") else "sqlite",
        "devices": rows,
        "gpus": devices,
        "nodes": len(everyone),
        "insert_s": insert_s,
        "load_s": load_s,
        "resync_s": resync_s,
        "repaired": repaired,
        "conflicts": index.conflicts,
        "after": after,
        "before": before_row,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| db | devices (GPU + CPU) | nodes | index | requests | placed | placement p50 ms "
        "| placement p99 ms | max ms | reserve p50 / p99 ms | request p50 / p99 ms |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        for label, m in (("after: long-lived", r["after"]), ("before: per request", r["before"])):
            if m is None:
                continue
            lines.append(
                f"| {r['db']} | {r['gpus']:,} + {r['devices'] - r['gpus']:,} | {r['nodes']:,} "
                f"| {label} | {m['n']} | {m['ok']} | {m['p50']:.2f} | {m['p99']:.2f} "
                f"| {m['max']:.1f} | {m['res_p50']:.1f} / {m['res_p99']:.1f} "
                f"| {m['req_p50']:.1f} / {m['req_p99']:.1f} |"
            )
    notes = [
        f"- {r['db']}: bulk insert {r['insert_s']:.1f} s; coordinator start with index load "
        f"{r['load_s']:.1f} s; one full resync {r['resync_s']:.1f} s (repaired {r['repaired']}, "
        f"stale-index reservation retries {r['conflicts']})"
        for r in rows
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return "\n".join([*lines, "", *notes]) + f"\n\nLoad average after the run: {load}."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", action="append", help="database URL (repeatable); default SQLite")
    parser.add_argument("--devices", type=int, default=100_000, help="GPU devices")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--before", type=int, default=5, help="requests on the old path")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for url in args.db or [f"sqlite:///{tmp}/bench.db"]:
            gc.collect()
            with fresh_schema(url) as fresh:
                row = run(fresh, args.devices, args.requests, args.before, args.seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    if args.record:
        section = (
            f"\n## placement inside a running coordinator (issue 11 §5)\n\n"
            f"{time.strftime('%Y-%m-%d', time.gmtime())} · 2-core x86_64 VM shared with five "
            f"other engineers' work, Python {platform.python_version()} · "
            f"`.venv/bin/python bench/placement_live.py {' '.join(sys.argv[1:])}`\n\n" + text + "\n"
        )
        existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        RESULTS.write_text(existing.rstrip("\n") + "\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
