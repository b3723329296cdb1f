"""Placement: choose the nodes and devices of a cluster from an index of free capacity.

Pure and in-memory. The coordinator keeps one :class:`DeviceIndex` up to date (upsert a
node's free capacity when it changes, :meth:`DeviceIndex.take` / :meth:`DeviceIndex.give_back`
around allocations) and calls :func:`place` per request. The index and its entries live in
:mod:`loom.core.placement_free` (re-exported here); this module holds the requirement, the
plan and the search.

Index (DESIGN.md §6): one *entry* per (node, device model) holding that node's free,
verified devices of the model. Entries live in buckets keyed by (model, region); each bucket
is a list sorted by ``(price, -reliability, node_id)`` maintained with ``bisect`` (insert and
remove are a binary search plus a memmove of one bucket, cheap at ~thousands per bucket).
A request never scans every node: it reads only the buckets of the models and regions it
accepts, cheapest first, and leaves a bucket as soon as it has ``nodes`` feasible rows, passes
``max_price``, or (once some region has a complete plan) provably cannot beat that plan. The
slow case is a filter so selective that no region can complete: every accepted bucket is read
to the end to prove it (still only those buckets, a few thousand rows each at 1 M devices).

Rules:

* One member per node, ever; a member takes ``count`` devices of one model on its node
  (``cpu``: ``cpus`` cores of the node's CPU device). Devices are allocatable one by one, so
  a multi-GPU host can serve several clusters.
* A node is placeable in states ``available`` or ``allocated`` (the latter: some devices
  already serve other clusters) and only its *verified* devices count.
* Filters: model any-of (with per-option count), VRAM per device, node RAM, regions,
  minimum security and connectivity tiers, max price per device-hour, min reliability.
* Cost of a member = price per device-hour x devices. The plan is the cheapest feasible set.
* Region rule: the cheapest *single-region* plan wins; only when no single region can host
  every member does placement fall back to the cheapest multi-region plan.
* Ties on cost prefer higher reliability, then node id (deterministic).
* The most reliable member is the Ray head; the rest are workers.

When nothing fits, :class:`PlacementFailure` says how many of the nodes could be placed and
which constraint binds (each constraint is relaxed in turn, e.g. "raise max_price to 0.45").
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from loom.core.catalog import CPU_MODEL
from loom.core.models import ConnectivityTier, SecurityTier
from loom.core.money import format_credits
from loom.core.placement_free import (
    PLACEABLE_NODE_STATES,
    DeviceIndex,
    FreeDevice,
    NodeCapacity,
)
from loom.core.placement_free import BucketRow as _Row
from loom.core.spec import ClusterSpec

__all__ = [
    "PLACEABLE_NODE_STATES",
    "DeviceIndex",
    "FreeDevice",
    "Member",
    "NodeCapacity",
    "PlacementFailure",
    "PlacementPlan",
    "Requirement",
    "place",
    "place_spec",
    "requirement_from_spec",
]

HEAD = "head"
WORKER = "worker"


@dataclass(frozen=True, slots=True)
class Requirement:
    """What each member needs. ``options`` are any-of ``(model, units)`` pairs."""

    options: tuple[tuple[str, int], ...]
    min_vram_gb: float = 0.0
    min_ram_gb: float = 0.0
    regions: frozenset[str] = frozenset()  # empty: anywhere
    security: SecurityTier = SecurityTier.COMMUNITY
    connectivity: ConnectivityTier = ConnectivityTier.LOW
    max_price_micro: int | None = None  # per device-hour
    min_reliability: float = 0.0

    def describe(self) -> str:
        """Human summary of the binding-relevant constraints: "rtx4090 under 0.3 in eu-west"."""
        models = " or ".join(m if u == 1 else f"{m}:{u}" for m, u in self.options)
        if any(m == CPU_MODEL for m, _ in self.options):
            models = " or ".join(f"{u} cpu cores" for _, u in self.options)
        parts = [models]
        if self.max_price_micro is not None:
            parts.append(f"under {format_credits(self.max_price_micro)}")
        if self.regions:
            parts.append("in " + "/".join(sorted(self.regions)))
        if self.min_vram_gb:
            parts.append(f"with >= {self.min_vram_gb:g} GB VRAM")
        if self.min_ram_gb:
            parts.append(f"with >= {self.min_ram_gb:g} GB RAM")
        if self.security > SecurityTier.COMMUNITY:
            parts.append(f"security >= {self.security.slug}")
        if self.connectivity > ConnectivityTier.LOW:
            parts.append(f"connectivity >= {self.connectivity.slug}")
        if self.min_reliability:
            parts.append(f"reliability >= {self.min_reliability:g}")
        return " ".join(parts)


def requirement_from_spec(spec: ClusterSpec) -> Requirement:
    res = spec.resources
    if res.gpu is not None:
        options = tuple((opt.model, opt.count) for opt in res.gpu)
    else:
        options = ((CPU_MODEL, res.cpus or 1),)
    return Requirement(
        options=options,
        min_vram_gb=float(res.min_vram_gb or 0),
        min_ram_gb=float(res.min_ram_gb or 0),
        regions=frozenset(spec.regions),
        security=spec.security,
        connectivity=spec.connectivity,
        max_price_micro=spec.max_price,
        min_reliability=spec.min_reliability or 0.0,
    )


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    device_ids: tuple[str, ...]  # cpu: the node's CPU device
    role: str  # "head" or "worker"
    model: str
    units: int  # devices (cpu: cores) taken
    region: str
    price_micro: int  # per device-hour
    reliability: float

    @property
    def hourly_micro(self) -> int:
        return self.price_micro * self.units


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    members: tuple[Member, ...]  # head first
    hourly_micro: int  # whole cluster, per hour
    regions: tuple[str, ...]  # sorted, distinct

    @property
    def single_region(self) -> bool:
        return len(self.regions) == 1

    @property
    def region(self) -> str | None:
        return self.regions[0] if self.single_region else None

    @property
    def head(self) -> Member:
        return self.members[0]

    def price_lines(self) -> list[tuple[int, int]]:
        """``(price per device-hour, devices)`` per member, for pricing.quote_lines."""
        return [(m.price_micro, m.units) for m in self.members]


@dataclass(frozen=True, slots=True)
class PlacementFailure:
    reason: str  # says what to change
    requested_nodes: int
    feasible_nodes: int  # how many members could be placed as asked
    binding: tuple[str, ...] = ()  # constraint names whose relaxation alone would fit
    suggestions: tuple[str, ...] = field(default=())


# ----------------------------------------------------------------------------- search

# A candidate member: (cost per hour, -reliability, node_id, units, model, price per unit).
_Cand = tuple[int, float, str, int, str, int]
_NO_PRICE_CAP = 1 << 62
_BOUND_MASK = 15  # check the pruning bound every 16 rows (tests set 0: every row)


def _scan(
    bucket: list[_Row],
    units: int,
    req: Requirement,
    limit: int,
    exclude: frozenset[str],
    bound: tuple[int, int, list[int]] | None = None,
) -> tuple[list[_Row], bool] | None:
    """The first ``limit`` feasible rows of a bucket; True when it stopped at the limit.

    ``bound`` is ``(cost to beat, members, lower bounds of other members' costs)``: every
    16 rows the scan checks whether a plan using rows of this bucket (all at least the
    current cost from here on) could still beat the cost, and returns None if not.
    """
    max_price = _NO_PRICE_CAP if req.max_price_micro is None else req.max_price_micro
    sec, con = int(req.security), int(req.connectivity)
    max_neg_rel, min_vram, min_ram = -req.min_reliability, req.min_vram_gb, req.min_ram_gb
    out: list[_Row] = []
    for i, row in enumerate(bucket):
        price, neg_rel, node_id, free, security, connectivity, vram, ram = row
        if price > max_price:
            break
        if bound is not None and not i & _BOUND_MASK:
            beat, n, pool = bound
            costs = pool + [r[0] * units for r in out] + [price * units] * n
            if sum(heapq.nsmallest(n, costs)) > beat:
                return None
        if (
            free >= units
            and security >= sec
            and connectivity >= con
            and neg_rel <= max_neg_rel
            and vram >= min_vram
            and ram >= min_ram
            and node_id not in exclude
        ):
            out.append(row)
            if len(out) == limit:
                return out, True
    return out, False


def _scan_region(
    index: DeviceIndex,
    req: Requirement,
    region: str,
    limit: int,
    exclude: frozenset[str],
    beat: tuple[int, int] | None = None,
) -> tuple[list[_Cand], tuple[int, float, str] | None]:
    """Candidates of one region, plus the smallest key beyond which a list was cut short.

    ``beat`` is ``(cost, members)`` of the best plan so far: a region that provably cannot
    cost less is abandoned early and returns no candidates.
    """
    cands: list[_Cand] = []
    cutoff: tuple[int, float, str] | None = None
    buckets = [
        (model, units, index._buckets.get(model, {}).get(region)) for model, units in req.options
    ]
    for j, (model, units, bucket) in enumerate(buckets):
        if not bucket:
            continue
        bound = None
        if beat is not None:
            pool = [c[0] for c in cands]
            for _, u, later in buckets[j + 1 :]:
                pool += [later[0][0] * u] * beat[1] if later else []
            bound = (beat[0], beat[1], pool)
        scanned = _scan(bucket, units, req, limit, exclude, bound)
        if scanned is None:
            return [], None
        rows, truncated = scanned
        cands.extend((r[0] * units, r[1], r[2], units, model, r[0]) for r in rows)
        if truncated:
            last = (rows[-1][0] * units, rows[-1][1], rows[-1][2])
            cutoff = last if cutoff is None or last < cutoff else cutoff
    return cands, cutoff


def _pick(cands: list[_Cand], cutoff: tuple[int, float, str] | None, n: int) -> list[_Cand] | None:
    """The ``n`` cheapest distinct nodes; None when a cut-short list may hide a cheaper one."""
    picks: list[_Cand] = []
    seen: set[str] = set()
    for cand in sorted(cands):
        if cutoff is not None and cand[:3] > cutoff:
            return None
        if cand[2] in seen:
            continue
        seen.add(cand[2])
        picks.append(cand)
        if len(picks) == n:
            return picks
    return None if cutoff is not None else picks


def _search(
    index: DeviceIndex, req: Requirement, n: int, exclude: frozenset[str]
) -> tuple[list[_Cand], int]:
    """(picks of the chosen plan or [], how many members fit anywhere, at most n).

    Each allowed (option, region) bucket is scanned once for its first ``n`` feasible rows
    (more only when the same node shows up under two models). The cheapest complete region
    wins; otherwise the cheapest ``n`` over all regions.
    """
    regions: set[str] = set()
    for model, _ in req.options:
        regions.update(
            r for r in index._buckets.get(model, {}) if not req.regions or r in req.regions
        )
    everything: list[_Cand] = []
    best: list[_Cand] = []
    best_score: tuple[int, float, str] | None = None
    # Biggest supply first: likely to complete cheaply, so later regions prune early.
    sizes = {
        r: sum(len(index._buckets.get(m, {}).get(r, ())) for m, _ in req.options) for r in regions
    }
    for region in sorted(regions, key=lambda r: (-sizes[r], r)):
        limit = n
        beat = (best_score[0], n) if best_score is not None else None
        while True:
            cands, cutoff = _scan_region(index, req, region, limit, exclude, beat)
            picks = _pick(cands, cutoff, n)
            if picks is not None:
                break
            limit *= 2
        everything.extend(cands)
        if len(picks) == n:
            score = (sum(p[0] for p in picks), sum(p[1] for p in picks), region)
            if best_score is None or score < best_score:
                best, best_score = picks, score
    if best:
        return best, n
    # No single region fits: every list was complete (a cut-short list means a full region).
    anywhere = _pick(everything, None, n) or []
    return (anywhere if len(anywhere) == n else []), len(anywhere)


def _plan(picks: list[_Cand], index: DeviceIndex) -> PlacementPlan:
    head = min(picks, key=lambda p: (p[1], p[0], p[2]))
    members: list[Member] = []
    for i, (_, neg_rel, node_id, units, model, price) in enumerate(
        [head] + [p for p in picks if p is not head]
    ):
        ids = index.free_ids(node_id, model)
        cap = index._entries[(node_id, model)]
        members.append(
            Member(
                node_id=node_id,
                device_ids=ids[:1] if model == CPU_MODEL else ids[:units],
                role=HEAD if i == 0 else WORKER,
                model=model,
                units=units,
                region=cap.region,
                price_micro=price,
                reliability=-neg_rel,
            )
        )
    return PlacementPlan(
        members=tuple(members),
        hourly_micro=sum(m.hourly_micro for m in members),
        regions=tuple(sorted({m.region for m in members})),
    )


def place(
    req: Requirement,
    nodes: int,
    index: DeviceIndex,
    *,
    exclude_nodes: Iterable[str] = (),
) -> PlacementPlan | PlacementFailure:
    """Place ``nodes`` members (``exclude_nodes``: e.g. a healing cluster's current nodes)."""
    if nodes < 1:
        raise ValueError("nodes must be at least 1")
    if not req.options:
        raise ValueError("a requirement needs at least one device option")
    exclude = frozenset(exclude_nodes)
    picks, feasible = _search(index, req, nodes, exclude)
    if picks:
        return _plan(picks, index)
    return _explain(req, nodes, feasible, index, exclude)


def place_spec(spec: ClusterSpec, index: DeviceIndex) -> PlacementPlan | PlacementFailure:
    return place(requirement_from_spec(spec), spec.nodes, index)


# ----------------------------------------------------------------------------- failures


def _explain(
    req: Requirement, n: int, feasible: int, index: DeviceIndex, exclude: frozenset[str]
) -> PlacementFailure:
    """Relax each constraint alone; those that make the request fit are the binding ones."""
    binding: list[str] = []
    hints: list[str] = []
    notes: list[str] = []  # for the reason: what each binding relaxation alone would place
    partial: dict[str, int] = {}  # relaxations that help but are not enough alone

    def fits(relaxed: Requirement, name: str = "") -> list[NodeCapacity]:
        picks, count = _search(index, relaxed, n, exclude)
        if name and not picks and count > feasible:
            partial[name] = max(partial.get(name, 0), count)
        return [index._entries[(p[2], p[4])] for p in picks]

    if req.max_price_micro is not None:
        caps = fits(replace(req, max_price_micro=None), "max_price")
        if caps:
            binding.append("max_price")
            hints.append(f"raise max_price to {format_credits(max(c.price_micro for c in caps))}")
            notes.append(f"{n} if max_price is dropped ({hints[-1]})")
    if req.regions:
        caps = fits(replace(req, regions=frozenset()), "regions")
        if caps:
            extra = sorted({c.region for c in caps} - req.regions)
            binding.append("regions")
            hints.append("add region " + ", ".join(extra) if extra else "drop the region filter")
            notes.append(f"{n} if regions is dropped ({hints[-1]})")
    for tier in sorted((t for t in SecurityTier if t < req.security), reverse=True):
        if fits(replace(req, security=tier), "security"):
            binding.append("security")
            hints.append(f"lower security to {tier.slug}")
            notes.append(f"{n} with security {tier.slug} ({hints[-1]})")
            break
    for ctier in sorted((t for t in ConnectivityTier if t < req.connectivity), reverse=True):
        if fits(replace(req, connectivity=ctier), "connectivity"):
            binding.append("connectivity")
            hints.append(f"lower connectivity to {ctier.slug}")
            notes.append(f"{n} with connectivity {ctier.slug} ({hints[-1]})")
            break
    floors = (
        ("min_vram_gb", req.min_vram_gb, replace(req, min_vram_gb=0.0), "vram_gb"),
        ("min_ram_gb", req.min_ram_gb, replace(req, min_ram_gb=0.0), "ram_gb"),
        ("min_reliability", req.min_reliability, replace(req, min_reliability=0.0), "reliability"),
    )
    for name, value, relaxed, attr in floors:
        caps = fits(relaxed, name) if value else []
        if caps:
            binding.append(name)
            hints.append(f"lower {name} to {min(float(getattr(c, attr)) for c in caps):g}")
            notes.append(f"{n} if {name} is dropped ({hints[-1]})")
    if not binding:
        hints.append(_no_single_fix(req, n, index, exclude))
        gains = ", ".join(f"{k} if {name} is dropped" for name, k in partial.items())
        notes.append(hints[-1] + (f" ({gains})" if gains else ""))
    if feasible == 0:
        head = f"0 of {n} nodes: no {req.describe()} is free"
    else:
        head = f"{feasible} of {n} nodes: not enough {req.describe()}"
    detail = ("either " + ", or ".join(notes)) if len(notes) > 1 else "".join(notes)
    return PlacementFailure(
        reason=f"{head}; {detail}",
        requested_nodes=n,
        feasible_nodes=feasible,
        binding=tuple(binding),
        suggestions=tuple(hints),
    )


def _no_single_fix(req: Requirement, n: int, index: DeviceIndex, exclude: frozenset[str]) -> str:
    _, total = _search(index, Requirement(options=req.options), n, exclude)
    if total < n:
        what = " or ".join(m for m, _ in req.options)
        return (
            f"only {total} node(s) with free {what} (at the requested count) exist right now; "
            "try another model, fewer nodes or fewer devices per node"
        )
    return "no single change is enough: relax several constraints at once"
