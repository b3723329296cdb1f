"""Benchmark: placement over 100,000 and 1,000,000 synthetic devices (DESIGN.md §6).

Run: .venv/bin/python bench/placement.py [--sizes 100000,1000000] [--requests 1000] [--record]

Synthetic supply: 20 GPU models x 30 regions; nodes carry 1, 2, 4 or 8 devices of one model;
prices spread 0.6x..1.6x around a per-model base; reliability 0.3..1.0; mixed security and
connectivity tiers; 2 % of devices unverified. Requests: 1..2 any-of models (1, 2 or 4
devices per node), 1..16 nodes, half pinned to 1..3 regions, some with max_price near the
model's base, higher tiers or a reliability floor. Each successful plan is allocated with
``take_plan`` (timed apart), so supply drains as it would. ``--record`` appends the figures to
bench/RESULTS.md under "## placement".
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

from loom.core.models import ConnectivityTier, DeviceState, SecurityTier
from loom.core.placement import (
    DeviceIndex,
    FreeDevice,
    NodeCapacity,
    PlacementPlan,
    Requirement,
    place,
)

MODELS = [
    "rtx5090", "rtx4090", "rtx4080", "rtx3090", "rtx3080", "a6000", "rtx6000-ada", "h200",
    "h100-sxm", "h100-pcie", "h100-nvl", "a100-80gb", "a100-40gb", "l40s", "l40", "l4", "a10",
    "v100", "t4", "mi300x",
]  # fmt: skip
CONTINENT_PARTS = {
    "eu": ["west", "east", "north", "south", "central"],
    "us": ["east", "west", "central", "south", "north"],
    "ap": ["south", "east", "north", "west", "southeast", "northeast"],
    "sa": ["east", "west", "north"],
    "af": ["south", "north", "west"],
    "me": ["central", "west", "east"],
    "oc": ["east", "west"],
    "ca": ["east", "west", "central"],
}
REGIONS = [f"{c}-{p}" for c, parts in CONTINENT_PARTS.items() for p in parts][:30]
BASE_PRICE = {m: 60_000 + i * 150_000 for i, m in enumerate(sorted(MODELS))}
VRAM = {m: 24 + (i % 5) * 16 for i, m in enumerate(MODELS)}
RESULTS = Path(__file__).with_name("RESULTS.md")


def build(devices: int, rng: random.Random) -> tuple[DeviceIndex, int]:
    index = DeviceIndex()
    made = 0
    node = 0
    while made < devices:
        count = min(rng.choice((1, 1, 1, 2, 2, 4, 8)), devices - made)
        model = rng.choice(MODELS)
        nid = f"node{node:07d}"
        devs = tuple(
            FreeDevice(
                f"{nid}-g{i}",
                DeviceState.VERIFIED if rng.random() > 0.02 else DeviceState.CLAIMED,
            )
            for i in range(count)
        )
        index.upsert(
            NodeCapacity(
                node_id=nid,
                model=model,
                region=rng.choice(REGIONS),
                devices=devs,
                price_micro=int(BASE_PRICE[model] * rng.uniform(0.6, 1.6)),
                reliability=round(rng.uniform(0.3, 1.0), 3),
                vram_gb=VRAM[model],
                ram_gb=rng.choice((32, 64, 128, 256)),
                cpus=rng.choice((8, 16, 32, 64)),
                security=rng.choice((SecurityTier.COMMUNITY,) * 3 + (SecurityTier.DATACENTER,)),
                connectivity=rng.choice(list(ConnectivityTier)),
            )
        )
        made += count
        node += 1
    return index, node


def request(rng: random.Random) -> tuple[Requirement, int]:
    models = rng.sample(MODELS, rng.choice((1, 1, 2)))
    options = tuple((m, rng.choice((1, 1, 1, 2, 4))) for m in models)
    regions: frozenset[str] = frozenset()
    roll = rng.random()
    if roll < 0.3:
        regions = frozenset({rng.choice(REGIONS)})
    elif roll < 0.5:
        regions = frozenset(rng.sample(REGIONS, rng.randint(2, 3)))
    max_price = None
    if rng.random() < 0.5:
        max_price = int(BASE_PRICE[models[0]] * rng.uniform(0.7, 1.3))
    return (
        Requirement(
            options=options,
            regions=regions,
            max_price_micro=max_price,
            security=SecurityTier.DATACENTER if rng.random() < 0.2 else SecurityTier.COMMUNITY,
            connectivity=rng.choice(
                (ConnectivityTier.LOW,) * 2 + (ConnectivityTier.MEDIUM, ConnectivityTier.HIGH)
            ),
            min_reliability=0.8 if rng.random() < 0.3 else 0.0,
        ),
        rng.randint(1, 16),
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(devices: int, requests: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    index, nodes = build(devices, rng)
    build_s = time.perf_counter() - t0
    # A long-lived index is old news to the cyclic GC: freeze it, as the coordinator should
    # after loading, so full collections do not walk a million objects mid-request.
    gc.collect()
    gc.freeze()
    ok_ms: list[float] = []
    fail_ms: list[float] = []
    take_ms: list[float] = []
    cpu_ms: list[float] = []  # process CPU time: what the wall figure is, minus contention
    for _ in range(requests):
        req, n = request(rng)
        c = time.process_time()
        t = time.perf_counter()
        result = place(req, n, index)
        elapsed = (time.perf_counter() - t) * 1000
        cpu_ms.append((time.process_time() - c) * 1000)
        if isinstance(result, PlacementPlan):
            ok_ms.append(elapsed)
            t = time.perf_counter()
            index.take_plan(result)
            take_ms.append((time.perf_counter() - t) * 1000)
        else:
            fail_ms.append(elapsed)
    gc.unfreeze()
    all_ms = ok_ms + fail_ms
    return {
        "devices": devices,
        "nodes": nodes,
        "entries": len(index),
        "build_s": build_s,
        "p50": statistics.median(all_ms),
        "p99": pct(all_ms, 0.99),
        "max": max(all_ms),
        "cpu_p99": pct(cpu_ms, 0.99),
        "ok": len(ok_ms),
        "ok_p99": pct(ok_ms, 0.99) if ok_ms else 0.0,
        "fail": len(fail_ms),
        "fail_p50": statistics.median(fail_ms) if fail_ms else 0.0,
        "fail_p99": pct(fail_ms, 0.99) if fail_ms else 0.0,
        "take_p99": pct(take_ms, 0.99) if take_ms else 0.0,
    }


def table(rows: list[dict[str, float]], requests: int) -> str:
    lines = [
        "| devices | nodes | build s | p50 ms | p99 ms | max ms | p99 CPU ms | placed "
        "| p99 placed ms | failed | p50 / p99 failed ms | take_plan p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {int(r['devices']):,} | {int(r['nodes']):,} | {r['build_s']:.1f} "
            f"| {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.1f} | {r['cpu_p99']:.2f} "
            f"| {int(r['ok'])} "
            f"| {r['ok_p99']:.2f} | {int(r['fail'])} "
            f"| {r['fail_p50']:.2f} / {r['fail_p99']:.2f} | {r['take_p99']:.3f} |"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return "\n".join(lines) + (
        f"\n\n{requests} requests per size; p50/p99/max are wall time (time.perf_counter), "
        f"p99 CPU is time.process_time. Load average after the run: {load} (shared cores)."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        row = run(size, args.requests, args.seed)
        rows.append(row)
        print(
            f"{size:>9,} devices ({int(row['nodes']):,} nodes): build {row['build_s']:.1f} s, "
            f"p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms (CPU {row['cpu_p99']:.2f} ms), "
            f"max {row['max']:.1f} ms, "
            f"placed {int(row['ok'])}, failed {int(row['fail'])} "
            f"(p99 {row['fail_p99']:.2f} ms), take_plan p99 {row['take_p99']:.3f} ms",
            flush=True,
        )
    text = table(rows, args.requests)
    print(text)
    if args.record:
        section = (
            "\n## placement\n\n2026-11-25 · 2-core x86_64 VM (python-svc), Python 3.11 · "
            "`.venv/bin/python bench/placement.py --record`\n\n" + text + "\n"
        )
        existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        RESULTS.write_text(existing.rstrip("\n") + "\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
