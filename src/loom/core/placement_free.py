"""Placement's free-capacity index: which devices are free where, price-ordered.

Pure and in-memory (split out of :mod:`loom.core.placement`, which searches it). One
*entry* per (node, device model) holding that node's free, verified devices of the model
(:class:`NodeCapacity`). Entries live in buckets keyed by (model, region); each bucket is a
list sorted by ``(price, -reliability, node_id)`` maintained with ``bisect`` (insert and
remove are a binary search plus a memmove of one bucket, cheap at ~thousands per bucket).
The owner upserts a node's capacity when it changes and :meth:`DeviceIndex.take` /
:meth:`DeviceIndex.give_back` around allocations.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from loom.core.catalog import CPU_MODEL
from loom.core.models import ConnectivityTier, DeviceState, NodeState, SecurityTier
from loom.core.query import Offer

__all__ = ["PLACEABLE_NODE_STATES", "DeviceIndex", "FreeDevice", "NodeCapacity"]

PLACEABLE_NODE_STATES = frozenset({NodeState.AVAILABLE, NodeState.ALLOCATED})


@dataclass(frozen=True, slots=True)
class FreeDevice:
    device_id: str
    state: DeviceState = DeviceState.VERIFIED


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """A node's free devices of one model, plus the node facts placement filters on.

    For ``model == "cpu"`` the node's CPU is one device and ``cpus`` is its free cores;
    ``price_micro`` is then per core-hour.
    """

    node_id: str
    model: str  # catalog slug
    region: str
    devices: tuple[FreeDevice, ...]
    price_micro: int  # per device-hour
    reliability: float = 0.0
    vram_gb: float = 0.0  # per device
    ram_gb: float = 0.0  # node RAM
    cpus: int = 0  # free cores
    security: SecurityTier = SecurityTier.COMMUNITY
    connectivity: ConnectivityTier = ConnectivityTier.LOW
    state: NodeState = NodeState.AVAILABLE
    country: str = ""
    node_name: str = ""

    @property
    def free_ids(self) -> tuple[str, ...]:
        """Verified device ids, sorted: what placement may hand out."""
        return tuple(sorted(d.device_id for d in self.devices if d.state is DeviceState.VERIFIED))

    @property
    def placeable(self) -> bool:
        return self.state in PLACEABLE_NODE_STATES and bool(self.free_ids)

    def to_offer(self) -> Offer:
        """This capacity as a search result (query.Offer)."""
        ids = self.free_ids
        return Offer(
            node_id=self.node_id,
            node_name=self.node_name or self.node_id,
            model=self.model,
            count=len(ids),
            vram_gb=self.vram_gb,
            cpus=self.cpus,
            ram_gb=self.ram_gb,
            region=self.region,
            country=self.country,
            price_micro=self.price_micro,
            reliability=self.reliability,
            verified=bool(ids),
            security=self.security,
            connectivity=self.connectivity,
        )


class _Taken(Protocol):
    """What :meth:`DeviceIndex.take_plan` reads of a plan's member."""

    @property
    def node_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def device_ids(self) -> tuple[str, ...]: ...
    @property
    def units(self) -> int: ...


class _Plan(Protocol):
    @property
    def members(self) -> Sequence[_Taken]: ...


# ----------------------------------------------------------------------------- index

# A bucket row: (price, -reliability, node_id, free_units, security, connectivity, vram, ram).
# Rows sort by the first three (node ids are unique in a bucket); the rest lets a scan filter
# without touching another structure. free_units: verified devices (cpu: free cores).
BucketRow = tuple[int, float, str, int, int, int, float, float]


class DeviceIndex:
    """Free capacity by (model, region), price-ordered. Not thread-safe: one owner."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], NodeCapacity] = {}  # (node, model) -> capacity
        self._free: dict[tuple[str, str], tuple[str, ...]] = {}  # placeable ids
        self._rows: dict[tuple[str, str], BucketRow] = {}  # listed rows
        self._buckets: dict[str, dict[str, list[BucketRow]]] = {}  # model -> region -> rows
        self._by_node: dict[str, set[str]] = {}  # node -> models
        self._devices = 0

    # -- maintenance
    def upsert(self, cap: NodeCapacity) -> None:
        """Add or replace a node's capacity for one model."""
        ident = (cap.node_id, cap.model)
        self._unlist(ident)
        self._entries[ident] = cap
        self._by_node.setdefault(cap.node_id, set()).add(cap.model)
        ids = cap.free_ids
        if cap.state not in PLACEABLE_NODE_STATES or not ids:
            return
        units = cap.cpus if cap.model == CPU_MODEL else len(ids)
        if units <= 0:
            return
        row: BucketRow = (
            cap.price_micro,
            -cap.reliability,
            cap.node_id,
            units,
            int(cap.security),
            int(cap.connectivity),
            cap.vram_gb,
            cap.ram_gb,
        )
        self._free[ident] = ids
        self._rows[ident] = row
        self._devices += len(ids)
        insort(self._buckets.setdefault(cap.model, {}).setdefault(cap.region, []), row)

    def remove(self, node_id: str, model: str | None = None) -> None:
        """Forget a node's capacity (one model, or all of them)."""
        models = [model] if model is not None else list(self._by_node.get(node_id, ()))
        for m in models:
            self._unlist((node_id, m))
            self._entries.pop((node_id, m), None)
            owned = self._by_node.get(node_id)
            if owned is not None:
                owned.discard(m)
                if not owned:
                    del self._by_node[node_id]

    def take(self, node_id: str, model: str, device_ids: Iterable[str], cpus: int = 0) -> None:
        """Mark devices as allocated (for cpu: ``cpus`` cores)."""
        cap = self._entries[(node_id, model)]
        if model == CPU_MODEL:
            left = max(0, cap.cpus - cpus)
            self.upsert(replace(cap, cpus=left, devices=cap.devices if left else ()))
            return
        gone = set(device_ids)
        self.upsert(replace(cap, devices=tuple(d for d in cap.devices if d.device_id not in gone)))

    def give_back(
        self, node_id: str, model: str, devices: Iterable[FreeDevice], cpus: int = 0
    ) -> None:
        """Return devices (for cpu: the CPU device and ``cpus`` cores) to free capacity."""
        cap = self._entries[(node_id, model)]
        have = {d.device_id for d in cap.devices}
        added = tuple(d for d in devices if d.device_id not in have)
        self.upsert(replace(cap, devices=cap.devices + added, cpus=cap.cpus + cpus))

    def take_plan(self, plan: _Plan) -> None:
        """Take every member's devices of a plan (``core.placement.PlacementPlan``)."""
        for m in plan.members:
            self.take(m.node_id, m.model, m.device_ids, cpus=m.units if m.model == CPU_MODEL else 0)

    def _unlist(self, ident: tuple[str, str]) -> None:
        row = self._rows.pop(ident, None)
        ids = self._free.pop(ident, None)
        old = self._entries.get(ident)
        if row is None or ids is None or old is None:
            return
        self._devices -= len(ids)
        regions = self._buckets[old.model]
        bucket = regions[old.region]
        i = bisect_left(bucket, row)
        if i < len(bucket) and bucket[i] == row:
            del bucket[i]
        if not bucket:
            del regions[old.region]
            if not regions:
                del self._buckets[old.model]

    # -- reads
    def get(self, node_id: str, model: str) -> NodeCapacity | None:
        return self._entries.get((node_id, model))

    def free_ids(self, node_id: str, model: str) -> tuple[str, ...]:
        return self._free.get((node_id, model), ())

    def __len__(self) -> int:
        """Placeable entries (node, model)."""
        return len(self._rows)

    @property
    def device_count(self) -> int:
        """Placeable devices (a node's CPU counts as one)."""
        return self._devices

    def models(self) -> list[str]:
        return sorted(self._buckets)

    def regions(self, model: str) -> list[str]:
        return sorted(self._buckets.get(model, {}))

    def walk(self, model: str, region: str) -> Iterator[NodeCapacity]:
        """Placeable capacity of one bucket, cheapest first (lazy)."""
        for row in list(self._buckets.get(model, {}).get(region, ())):
            yield self._entries[(row[2], model)]

    def offers(self, model: str | None = None, region: str | None = None) -> Iterator[Offer]:
        """Offers for search, bucket by bucket (each bucket price-ordered)."""
        for m in [model] if model is not None else self.models():
            for r in [region] if region is not None else self.regions(m):
                for cap in self.walk(m, r):
                    yield cap.to_offer()
