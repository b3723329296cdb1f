"""Synthetic supply written straight into a coordinator's database, in bulk.

For tests and benchmarks that need a network far larger than agents can be started for
(tens of thousands of nodes): rows are inserted in batches with executemany, as a real
network's registrations would have left them (nodes `available`, devices `verified`, one
CPU device per node). Writers must then tell the placement index (a full ``load``), since
these rows bypass the services that publish change events.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loom.coordinator.db.models import Device, Node

MODELS = ("rtx4090", "rtx3090", "a100-80gb", "h100-sxm", "l40s", "rtx4080", "a6000", "t4")
REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-northeast")
BATCH = 5000


@dataclass(frozen=True, slots=True)
class Supply:
    node_ids: tuple[str, ...]
    gpu_devices: int
    cpu_devices: int

    @property
    def devices(self) -> int:
        return self.gpu_devices + self.cpu_devices


async def insert_supply(
    sessions: async_sessionmaker[AsyncSession],
    gpu_devices: int,
    *,
    seed: int = 7,
    prefix: str = "syn",
    models: Sequence[str] = MODELS,
    regions: Sequence[str] = REGIONS,
    sizes: Sequence[int] = (1, 1, 1, 2, 2, 4, 8),
) -> Supply:
    """Nodes carrying ``sizes`` GPUs of one model until ``gpu_devices`` are written."""
    rng = random.Random(seed)
    now = time.time()
    nodes: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    made = 0
    while made < gpu_devices:
        count = min(rng.choice(sizes), gpu_devices - made)
        i = len(nodes)
        node_id = f"{prefix}{i:07d}"
        model = rng.choice(models)
        nodes.append(
            {
                "id": node_id,
                "node_key": f"{prefix}-key-{i:058d}"[-64:],
                "owner_key": "0" * 64,
                "name": f"{prefix}-{i}",
                "region": rng.choice(regions),
                "country": "",
                "price_micro": rng.randint(50_000, 3_000_000),
                "price_auto": False,
                "state": "available",
                "state_changed_at": now,
                "registered_at": now - 86_400,
                "heartbeats": rng.randint(0, 10_000),
                "cpu_cores": 16,
                "ram_mb": rng.choice((32, 64, 128, 256)) * 1024,
            }
        )
        devices.append(_device(f"{node_id}:cpu", node_id, "cpu", "cpu", None, 16, None))
        for g in range(count):
            devices.append(_device(f"{node_id}:gpu{g}", node_id, "gpu", model, g, None, 24_576))
        made += count
    async with sessions() as session:
        conn = await session.connection()  # Core executemany: no ORM bookkeeping per row
        for start in range(0, len(nodes), BATCH):
            await conn.execute(insert(cast(Table, Node.__table__)), nodes[start : start + BATCH])
        for start in range(0, len(devices), BATCH):
            await conn.execute(
                insert(cast(Table, Device.__table__)), devices[start : start + BATCH]
            )
        await session.commit()
    return Supply(tuple(n["id"] for n in nodes), made, len(nodes))


def _device(
    dev_id: str,
    node_id: str,
    kind: str,
    model: str,
    idx: int | None,
    count: int | None,
    vram_mb: int | None,
) -> dict[str, Any]:
    return {
        "id": dev_id,
        "node_id": node_id,
        "kind": kind,
        "model": model,
        "name": model,
        "idx": idx,
        "count": count,
        "vram_mb": vram_mb,
        "uuid": "",
        "declared": False,
        "state": "verified",
        "present": True,
        "allocated_units": 0,
        "verified_units": count,
    }
