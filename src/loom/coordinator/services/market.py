"""The market: live offers (searched with the offer query language), quotes, auto prices."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loom.coordinator.bus import publish_on
from loom.coordinator.db.models import Device, Node
from loom.coordinator.errors import BadRequest, Conflict
from loom.coordinator.placement_index import PlacementIndex, loaded_now
from loom.coordinator.services import clusters as cluster_service
from loom.core.catalog import CPU_MODEL
from loom.core.metering import escrow_needed
from loom.core.models import NodeState
from loom.core.placement import PlacementFailure, PlacementPlan
from loom.core.pricing import Quote, median_price, quote_lines
from loom.core.query import Offer, QueryError, filter_offers, parse_query, sort_offers
from loom.core.spec import ClusterSpec
from loom.protocol.events import ChangeCause

PLACEABLE = (NodeState.AVAILABLE.value, NodeState.ALLOCATED.value)
#: Nodes whose price counts for the network median (`--price auto`).
PRICED = (
    NodeState.VERIFYING.value,
    *PLACEABLE,
    NodeState.OFFLINE.value,
    NodeState.DRAINED.value,
)
MAX_OFFERS = 1000


async def live_offers(
    session: AsyncSession,
    *,
    connected: AbstractSet[str] | None,
    models: frozenset[str] | None = None,
    index: PlacementIndex | None = None,
) -> list[Offer]:
    """One offer per (node, model) with free devices, from placeable (and connected) nodes,
    read from the coordinator's long-lived index (``placement_index.offers_of`` is the one
    place that turns rows into offers); without one, from an index loaded for this call."""
    if index is None:
        index = await loaded_now(session, require_verified=False, presence=connected)
    return await index.offers(connected=connected, models=models)


async def search(
    session: AsyncSession,
    query: str,
    *,
    sort: str = "price",
    limit: int = 100,
    connected: AbstractSet[str] | None,
    index: PlacementIndex | None = None,
) -> list[Offer]:
    """Offers matching ``query``; a parse error is a 400 whose message points at the token."""
    try:
        parsed = parse_query(query)
    except QueryError as exc:
        raise BadRequest("invalid_query", str(exc), field="q") from None
    try:
        sort_offers([], sort)
    except ValueError as exc:
        raise BadRequest("invalid_sort", str(exc), field="sort") from None
    offers = await live_offers(session, connected=connected, models=parsed.models(), index=index)
    return sort_offers(filter_offers(parsed, offers), sort)[: max(1, min(limit, MAX_OFFERS))]


@dataclass(frozen=True, slots=True)
class QuoteResult:
    plan: PlacementPlan
    quote: Quote
    escrow_micro: int
    model: str


async def quote_spec(
    session: AsyncSession,
    spec: ClusterSpec,
    *,
    connected: AbstractSet[str],
    require_verified: bool,
    index: PlacementIndex | None = None,
) -> QuoteResult:
    """Price a spec on the placement `cluster up` would make right now."""
    plan = await cluster_service.placement_for(
        session,
        spec,
        spec.nodes,
        connected=connected,
        require_verified=require_verified,
        index=index,
    )
    if isinstance(plan, PlacementFailure):
        raise Conflict("no_capacity", plan.reason)
    model = plan.head.model
    result = quote_lines(
        plan.price_lines(), spec.duration, model=None if model == CPU_MODEL else model
    )
    escrow = sum(escrow_needed(m.price_micro, m.units, spec.duration) for m in plan.members)
    return QuoteResult(plan=plan, quote=result, escrow_micro=escrow, model=model)


async def refresh_auto_prices(session: AsyncSession) -> int:
    """Set every `--price auto` node to the median price of its model among fixed-price
    nodes; returns how many changed. A model nobody prices yet keeps the current price."""
    rows = await session.execute(
        select(Node.id, Node.price_micro, Node.price_auto, Device.model)
        .join(Device, Device.node_id == Node.id)
        .where(Device.present.is_(True), Node.state.in_(PRICED))
    )
    models: dict[str, Counter[str]] = defaultdict(Counter)
    price: dict[str, int] = {}
    auto: set[str] = set()
    for node_id, price_micro, price_auto, model in rows:
        models[node_id][model] += 1
        price[node_id] = int(price_micro)
        if price_auto:
            auto.add(node_id)
    if not auto:
        return 0

    def primary(node_id: str) -> str:
        gpus = [(n, m) for m, n in models[node_id].items() if m != CPU_MODEL]
        return max(gpus)[1] if gpus else CPU_MODEL

    fixed: dict[str, list[int]] = defaultdict(list)
    for node_id in price:
        if node_id not in auto:
            fixed[primary(node_id)].append(price[node_id])
    changed = 0
    for node_id in sorted(auto):
        median = median_price(fixed.get(primary(node_id), []))
        if median is not None and median != price[node_id]:
            await session.execute(update(Node).where(Node.id == node_id).values(price_micro=median))
            publish_on(session, node_id, ChangeCause.PRICE)
            changed += 1
    return changed
