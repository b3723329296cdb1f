"""The coordinator's long-lived placement index: free capacity and reliability, in memory.

Built once at start (keyset-paged queries over node-id ranges, never an IN-list of the
network), then kept current by change events (``loom.protocol.events``) published on the
coordinator's bus by the code that changes placeability: node state transitions, device
verdicts, reservations and releases, price refreshes, presence of agents. An event only
marks its node *dirty* and the node is re-read from the database (bounded chunks), so events
carry no values and a duplicated one is harmless; it is read again :data:`SETTLE_S` later, in
case the first read raced the publisher's commit. *Urgent* changes (anything that may make
memory offer too much: state, verdict, facts, price, a lost reservation race) unlist the
node at once, until it is re-read; every change is re-read by the background
:meth:`refresh` every :data:`REFRESH_S`, this process's own reservations being applied to
memory at once (:meth:`PlacementIndex.reserved`). A placement therefore reads no database
on its way, except when memory cannot place it while urgent nodes wait unlisted: those
are re-read first (a node that just became available is placeable at once).
:meth:`PlacementIndex.resync` (every :data:`RESYNC_S`) re-reads everything and repairs any
missed event; scores are recomputed in full every :data:`SCORE_RESYNC_S`.

Reservation is still the conditional UPDATE of ``services.allocation.reserve``: a stale
index can only propose a device that is no longer free, which costs a retry (the loser
invalidates the device's node and places again), never a double allocation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loom.coordinator.bus import Event, EventBus
from loom.coordinator.db.batching import chunks
from loom.coordinator.db.models import Device, Node
from loom.coordinator.services.reliability import node_scores
from loom.core.catalog import CPU_MODEL
from loom.core.challenge.capacity import offered_units
from loom.core.models import ConnectivityTier, DeviceState, NodeState, SecurityTier
from loom.core.placement import (
    DeviceIndex,
    FreeDevice,
    NodeCapacity,
    PlacementFailure,
    PlacementPlan,
    Requirement,
    place,
)
from loom.core.query import Offer
from loom.protocol.events import ChangeCause, NodeChanged, NodePresence

log = logging.getLogger(__name__)

PAGE = 2000  # nodes per page when loading
RESYNC_S = 60.0
REFRESH_S = 0.25  # background re-read of dirty nodes
REFRESH_CHUNK = 200  # nodes per re-read query (bounded; keeps each refresh step short)
SCORE_RESYNC_S = 600.0
SETTLE_S = 2.0
DEFAULT_RELIABILITY = 0.5
PLACEABLE = frozenset({NodeState.AVAILABLE.value, NodeState.ALLOCATED.value})
MAX_RETRIES = 4
#: Changes that cannot make memory offer what the database forbids (a stale free unit is
#: refused by the reservation's conditional UPDATE; a score only orders and filters by
#: preference): re-read by the background refresh, the node staying listed meanwhile.
LAZY = frozenset({ChangeCause.ALLOCATION, ChangeCause.RELIABILITY})


@dataclass(frozen=True, slots=True)
class DeviceRow:
    id: str
    model: str
    count: int | None
    verified_units: int | None
    allocated_units: int
    state: str
    vram_mb: int | None

    @property
    def capacity(self) -> int:
        return offered_units(self.count, self.verified_units)

    @property
    def free(self) -> bool:
        return self.allocated_units < self.capacity


@dataclass(frozen=True, slots=True)
class NodeRow:
    """What placement and offers read about a node: its facts and present, unfailed devices."""

    id: str
    name: str
    region: str
    country: str
    price_micro: int
    ram_mb: int
    cpu_cores: int
    state: str
    devices: tuple[DeviceRow, ...]


_NODE_COLS = (
    Node.id,
    Node.name,
    Node.region,
    Node.country,
    Node.price_micro,
    Node.ram_mb,
    Node.cpu_cores,
    Node.state,
)
_DEV_COLS = (
    Device.node_id,
    Device.id,
    Device.model,
    Device.count,
    Device.verified_units,
    Device.allocated_units,
    Device.state,
    Device.vram_mb,
)


def _device_filter() -> ColumnElement[bool]:
    return and_(Device.present.is_(True), Device.state != DeviceState.FAILED.value)


async def _load_range(session: AsyncSession, after: str, limit: int) -> list[NodeRow]:
    """Up to ``limit`` nodes with id > ``after`` (id order), with their devices."""
    heads = (
        await session.execute(
            select(*_NODE_COLS).where(Node.id > after).order_by(Node.id).limit(limit)
        )
    ).all()
    if not heads:
        return []
    last = heads[-1][0]
    devices: dict[str, list[DeviceRow]] = {}
    rows = await session.execute(
        select(*_DEV_COLS).where(Device.node_id > after, Device.node_id <= last, _device_filter())
    )
    for r in rows:
        devices.setdefault(r[0], []).append(_device_row(r))
    return [_node_row(h, devices.get(h[0], [])) for h in heads]


async def _load_nodes(session: AsyncSession, ids: list[str]) -> dict[str, NodeRow]:
    """The given nodes (at most :data:`~loom.coordinator.db.batching.CHUNK` ids)."""
    heads = (await session.execute(select(*_NODE_COLS).where(Node.id.in_(ids)))).all()
    devices: dict[str, list[DeviceRow]] = {}
    rows = await session.execute(
        select(*_DEV_COLS).where(Device.node_id.in_(ids), _device_filter())
    )
    for r in rows:
        devices.setdefault(r[0], []).append(_device_row(r))
    return {str(h[0]): _node_row(h, devices.get(h[0], [])) for h in heads}


def _device_row(r: Sequence[Any]) -> DeviceRow:
    return DeviceRow(
        id=str(r[1]),
        model=str(r[2]),
        count=r[3],
        verified_units=r[4],
        allocated_units=int(r[5] or 0),
        state=str(r[6]),
        vram_mb=r[7],
    )


def _node_row(h: Sequence[Any], devices: list[DeviceRow]) -> NodeRow:
    return NodeRow(
        id=str(h[0]),
        name=str(h[1]),
        region=str(h[2]),
        country=str(h[3] or ""),
        price_micro=int(h[4] or 0),
        ram_mb=int(h[5] or 0),
        cpu_cores=int(h[6] or 0),
        state=str(h[7]),
        devices=tuple(sorted(devices, key=lambda d: d.id)),
    )


def capacities(node: NodeRow, reliability: float, *, require_verified: bool) -> list[NodeCapacity]:
    """The index entries of a node, one per model with free devices: the one place that
    turns database rows into placement capacity."""
    by_model: dict[str, list[DeviceRow]] = {}
    for dev in node.devices:
        if require_verified and dev.state != DeviceState.VERIFIED.value:
            continue
        by_model.setdefault(dev.model, []).append(dev)
    out: list[NodeCapacity] = []
    for model, rows in by_model.items():
        free = [d for d in rows if d.free]
        if not free:
            continue
        cpus = (free[-1].capacity - free[-1].allocated_units) if model == CPU_MODEL else 0
        out.append(
            NodeCapacity(
                node_id=node.id,
                model=model,
                region=node.region,
                # Until verification gates placement, claimed devices are offered as verified.
                devices=tuple(FreeDevice(d.id, DeviceState.VERIFIED) for d in free),
                price_micro=node.price_micro,
                reliability=reliability,
                vram_gb=max((d.vram_mb or 0) for d in rows) / 1024,
                ram_gb=node.ram_mb / 1024,
                cpus=cpus,
                security=SecurityTier.COMMUNITY,
                connectivity=ConnectivityTier.ULTRA,
                state=NodeState(node.state),
                country=node.country,
                node_name=node.name,
            )
        )
    return out


def offers_of(node: NodeRow, reliability: float, models: frozenset[str] | None) -> list[Offer]:
    """The market's offers of a node: the one place that turns rows into offers."""
    by_model: dict[str, list[DeviceRow]] = {}
    for dev in node.devices:
        if models is None or dev.model in models:
            by_model.setdefault(dev.model, []).append(dev)
    out: list[Offer] = []
    for model, rows in by_model.items():
        free = [d for d in rows if d.free]
        if not free:
            continue
        if model == CPU_MODEL:
            cpus, count = sum(d.capacity - d.allocated_units for d in free), 1
        else:
            cpus, count = node.cpu_cores, len(free)
        out.append(
            Offer(
                node_id=node.id,
                node_name=node.name,
                model=model,
                count=count,
                vram_gb=max((d.vram_mb or 0) for d in free) / 1024,
                cpus=cpus,
                ram_gb=node.ram_mb / 1024,
                region=node.region,
                country=node.country,
                price_micro=node.price_micro,
                reliability=reliability,
                verified=any(d.state == DeviceState.VERIFIED.value for d in free),
                security=SecurityTier.COMMUNITY,
                connectivity=ConnectivityTier.ULTRA,
            )
        )
    return out


class PlacementIndex:
    """One per coordinator process; see the module docstring. Single event-loop owner."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        require_verified: bool,
        presence: Container[str] | None = None,
        heartbeat_interval_s: float = 5.0,
    ) -> None:
        self.sessions = sessions
        self.require_verified = require_verified
        #: A live view of the nodes whose agent is connected (the hub's connections); only
        #: those are listed. A node is re-listed on its NodePresence event, or when a
        #: placement finds it gone. None: every placeable node is listed.
        self.presence = presence
        self.heartbeat_interval_s = heartbeat_interval_s
        self.settle_s = SETTLE_S
        self.page = PAGE
        self.index = DeviceIndex()
        self.nodes: dict[str, NodeRow] = {}
        self.scores: dict[str, float] = {}
        self._device_node: dict[str, str] = {}
        #: node id -> (monotonic time of its last event, read since that event)
        self._dirty: dict[str, tuple[float, bool]] = {}
        #: Dirty nodes whose change may make memory offer too much (a state, verdict, fact
        #: or price change, or a lost reservation race): re-read before the next placement.
        #: Allocation changes are not urgent: this process applies its own reservations to
        #: memory at once (:meth:`reserved`), and a stale free unit costs only a retry.
        self._urgent: set[str] = set()
        #: Bumped when this process changes a node in memory (:meth:`reserved`): a re-read
        #: that started before cannot overwrite it with the older row.
        self._local: dict[str, int] = {}
        #: node id -> monotonic time its last re-read (:meth:`refresh`) started: a resync page
        #: read before that must not overwrite the newer row (nor forget a newer node).
        self._read_at: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self.loaded = False
        self.loaded_at = 0.0
        self.scored_at = 0.0
        self.refreshed_nodes = 0  # node re-reads caused by events (for tests and metrics)
        self.repaired = 0  # nodes the last resync found different from memory
        self.conflicts = 0  # reservations that found the index stale

    @property
    def dirty(self) -> int:
        """Nodes waiting to be re-read (0: memory agrees with every event seen)."""
        return len(self._dirty)

    # -- events
    def attach(self, bus: EventBus) -> None:
        bus.subscribe(self.on_event)

    def on_event(self, event: Event) -> None:
        if isinstance(event, NodePresence):
            self._relist(event.node_id)
        elif isinstance(event, NodeChanged):
            self._dirty[event.node_id] = (time.monotonic(), False)
            if event.cause not in LAZY:
                # Unlisted until re-read: memory never offers what the change may forbid.
                self._urgent.add(event.node_id)
                self.index.remove(event.node_id)

    def invalidate_device(self, device_id: str) -> None:
        """A reservation of ``device_id`` lost a race: re-read its node before placing."""
        self.conflicts += 1
        node_id = self._device_node.get(device_id)
        if node_id is not None:
            self._dirty[node_id] = (time.monotonic() - self.settle_s, True)  # re-read, now
            self._urgent.add(node_id)
            self.index.remove(node_id)

    # -- loading
    async def load(self) -> None:
        """Everything, page by page; then the scores. Replaces what memory holds."""
        versions = dict(self._local)
        started = time.monotonic()
        fresh = await self._read_all()  # outside the lock: refreshes go on meanwhile
        async with self._lock:
            for node_id, version in self._local.items():
                if versions.get(node_id, 0) != version:  # changed here during the read
                    fresh.pop(node_id, None)
                    self._dirty[node_id] = (time.monotonic(), False)
            # Re-read by a refresh while the pages were read: memory holds the newer row.
            newer = {n for n, at in self._read_at.items() if at >= started}
            for node_id in newer:
                fresh.pop(node_id, None)
            seen = set(fresh) | newer
            for node_id in [n for n in self.nodes if n not in seen and n not in self._dirty]:
                self._forget(node_id)
            changed = [row for row in fresh.values() if self.nodes.get(row.id) != row]
            now = time.time()
            rescore = not self.loaded or now - self.scored_at >= SCORE_RESYNC_S
            for row in changed:
                self._store(row, relist=not rescore)
            # Differences no pending event explains: what a missed event would have left.
            missed = [row.id for row in changed if row.id not in self._dirty]
            self.repaired = len(missed) if self.loaded else 0
            if missed and self.loaded:
                log.warning("placement resync repaired %d node(s), e.g. %s", len(missed), missed[0])
            keep = started - RESYNC_S  # what a load still reading (started since) may need
            self._read_at = {n: at for n, at in self._read_at.items() if at >= keep}
            if rescore:
                await self._score(list(self.nodes))
                self.scored_at = now
                for node_id in self.nodes:
                    self._relist(node_id)
            self.loaded, self.loaded_at = True, now

    async def resync(self) -> int:
        """Re-read everything and repair what differs (a missed event); returns repairs."""
        await self.load()
        return self.repaired

    async def _read_all(self) -> dict[str, NodeRow]:
        out: dict[str, NodeRow] = {}
        after = ""
        while True:
            async with self.sessions() as session:
                page = await _load_range(session, after, self.page)
            if not page:
                return out
            for row in page:
                out[row.id] = row
            after = page[-1].id
            await asyncio.sleep(0)  # let requests run between pages

    async def _score(self, node_ids: list[str]) -> None:
        for chunk in chunks(node_ids):
            async with self.sessions() as session:
                got = await node_scores(
                    session, chunk, now=time.time(), heartbeat_interval_s=self.heartbeat_interval_s
                )
            for node_id in chunk:
                self.scores[node_id] = got.get(node_id, DEFAULT_RELIABILITY)

    async def refresh(self, *, urgent_only: bool = False) -> None:
        """Re-read the dirty nodes (and their scores) in bounded chunks.

        A node is read right after its event and once more :data:`SETTLE_S` later (a read
        that raced the publisher's commit saw the old row), then it is clean.
        ``urgent_only``: only the unlisted (urgent) ones, for a request that needs them.
        """
        if not self._dirty and not self._urgent:
            return
        now = time.monotonic()
        ids: list[str] = []
        seen: dict[str, float] = {}  # the event each read answers
        for node_id, (marked, read) in list(self._dirty.items()):
            if urgent_only and node_id not in self._urgent:
                continue
            if not read or node_id in self._urgent:
                self._dirty[node_id] = (marked, True)
            elif now - marked >= self.settle_s:
                del self._dirty[node_id]
            else:
                continue
            ids.append(node_id)
            seen[node_id] = marked
        for node_id in self._urgent - seen.keys():  # its read is in flight elsewhere: again
            ids.append(node_id)
            seen[node_id] = -1.0
        ids.sort(key=lambda n: (n not in self._urgent, n))  # urgent ones first
        for chunk in chunks(ids, REFRESH_CHUNK):
            async with self._lock:  # a chunk at a time: an urgent caller gets in between
                await self._reread(chunk, seen)

    async def _reread(self, chunk: list[str], seen: dict[str, float]) -> None:
        versions = {n: self._local.get(n, 0) for n in chunk}
        started = time.monotonic()
        async with self.sessions() as session:
            rows = await _load_nodes(session, chunk)
            got = await node_scores(
                session, chunk, now=time.time(), heartbeat_interval_s=self.heartbeat_interval_s
            )
        for node_id in chunk:
            row = rows.get(node_id)
            if self._local.get(node_id, 0) != versions[node_id]:
                self._dirty[node_id] = (time.monotonic(), False)  # changed here meanwhile
                continue
            self._read_at[node_id] = started
            entry = self._dirty.get(node_id)  # urgent until a read started after its last event
            if entry is None or entry[0] == seen[node_id]:
                self._urgent.discard(node_id)
            if row is None:
                self._forget(node_id)
                continue
            self.scores[node_id] = got.get(node_id, DEFAULT_RELIABILITY)
            self._store(row)  # listed again unless still urgent
        self.refreshed_nodes += len(chunk)

    def reserved(self, plan: PlacementPlan) -> None:
        """This process committed ``plan``'s reservation: take its units in memory now."""
        for member in plan.members:
            row = self.nodes.get(member.node_id)
            if row is None:
                continue
            units = member.units if member.model == CPU_MODEL else 1
            taken = set(member.device_ids)
            self._local[member.node_id] = self._local.get(member.node_id, 0) + 1
            devices = tuple(
                replace(d, allocated_units=d.allocated_units + units) if d.id in taken else d
                for d in row.devices
            )
            self._store(replace(row, devices=devices))

    # -- memory
    def _store(self, row: NodeRow, *, relist: bool = True) -> None:
        old = self.nodes.get(row.id)
        if old is not None:
            for dev in old.devices:
                self._device_node.pop(dev.id, None)
        self.nodes[row.id] = row
        for dev in row.devices:
            self._device_node[dev.id] = row.id
        if relist:
            self._relist(row.id)

    def _forget(self, node_id: str) -> None:
        old = self.nodes.pop(node_id, None)
        if old is not None:
            for dev in old.devices:
                self._device_node.pop(dev.id, None)
        self.scores.pop(node_id, None)
        self.index.remove(node_id)

    def _relist(self, node_id: str) -> None:
        self.index.remove(node_id)
        row = self.nodes.get(node_id)
        if row is None or row.state not in PLACEABLE or node_id in self._urgent:
            return
        if self.presence is not None and node_id not in self.presence:
            return
        score = self.scores.get(node_id, DEFAULT_RELIABILITY)
        for cap in capacities(row, score, require_verified=self.require_verified):
            self.index.upsert(cap)

    # -- reads
    async def place(
        self,
        req: Requirement,
        nodes: int,
        *,
        connected: Container[str] | None = None,
        exclude_nodes: Iterable[str] = (),
    ) -> PlacementPlan | PlacementFailure:
        """Place from memory; a member on a node not in ``connected`` is excluded and retried.

        No database read on this path unless memory cannot place the request while some
        nodes wait unlisted for a re-read (an urgent change): then those nodes (only) are
        re-read and placement runs once more.
        """
        if not self.loaded:
            await self.load()
        result = self._place(req, nodes, connected, exclude_nodes)
        if isinstance(result, PlacementFailure) and self._urgent:
            await self.refresh(urgent_only=True)
            result = self._place(req, nodes, connected, exclude_nodes)
        return result

    def _place(
        self,
        req: Requirement,
        nodes: int,
        connected: Container[str] | None,
        exclude_nodes: Iterable[str],
    ) -> PlacementPlan | PlacementFailure:
        exclude = set(exclude_nodes)
        result = place(req, nodes, self.index, exclude_nodes=frozenset(exclude))
        for _ in range(MAX_RETRIES):
            if isinstance(result, PlacementFailure) or connected is None:
                return result
            gone = [m.node_id for m in result.members if m.node_id not in connected]
            if not gone:
                return result
            for node_id in gone:
                self._relist(node_id)  # drops it when its agent is gone from presence too
            exclude.update(gone)
            result = place(req, nodes, self.index, exclude_nodes=frozenset(exclude))
        return result

    async def offers(
        self, *, connected: Container[str] | None, models: frozenset[str] | None = None
    ) -> list[Offer]:
        """The market's live offers from memory (connected, placeable nodes)."""
        if not self.loaded:
            await self.load()
        if self._urgent:
            await self.refresh(urgent_only=True)
        out: list[Offer] = []
        for node_id, row in self.nodes.items():
            if row.state not in PLACEABLE:
                continue
            if connected is not None and node_id not in connected:
                continue
            if self.presence is not None and node_id not in self.presence:
                continue
            out.extend(offers_of(row, self.scores.get(node_id, DEFAULT_RELIABILITY), models))
        return out


async def loaded_now(
    session: AsyncSession, *, require_verified: bool, presence: Container[str] | None
) -> PlacementIndex:
    """A throwaway index loaded from ``session``'s database now, for a caller without the
    coordinator's long-lived one (tools, tests): the same code, paid per call."""
    if session.bind is None:
        raise RuntimeError("the session is not bound to a database")
    index = PlacementIndex(
        async_sessionmaker(session.bind, expire_on_commit=False),
        require_verified=require_verified,
        presence=presence,
    )
    await index.load()
    return index
