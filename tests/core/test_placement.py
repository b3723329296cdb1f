from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.core import placement as placement_module
from loom.core import placement_free
from loom.core.models import ConnectivityTier, DeviceState, NodeState, SecurityTier
from loom.core.placement import (
    DeviceIndex,
    FreeDevice,
    NodeCapacity,
    PlacementFailure,
    PlacementPlan,
    Requirement,
    place,
    place_spec,
    requirement_from_spec,
)
from loom.core.spec import load_spec


def cap(
    node: str,
    region: str = "eu-west",
    price: float = 0.3,
    model: str = "rtx4090",
    gpus: int = 1,
    **kw: object,
) -> NodeCapacity:
    defaults: dict[str, object] = {
        "reliability": 0.9,
        "vram_gb": 24.0,
        "ram_gb": 64.0,
        "cpus": 16,
        "security": SecurityTier.COMMUNITY,
        "connectivity": ConnectivityTier.HIGH,
    }
    defaults.update(kw)
    devices = tuple(FreeDevice(f"{node}-g{i}") for i in range(gpus))
    return NodeCapacity(
        node,
        model,
        region,
        devices,
        price_micro=round(price * 1_000_000),
        **defaults,  # type: ignore[arg-type]
    )


def index_of(*caps: NodeCapacity) -> DeviceIndex:
    index = DeviceIndex()
    for c in caps:
        index.upsert(c)
    return index


RTX = Requirement(options=(("rtx4090", 1),))


def plan_of(result: PlacementPlan | PlacementFailure) -> PlacementPlan:
    assert isinstance(result, PlacementPlan), result
    return result


def test_cheapest_nodes_head_is_most_reliable() -> None:
    index = index_of(
        cap("a", price=0.5),
        cap("b", price=0.2, reliability=0.6),
        cap("c", price=0.3, reliability=0.99),
        cap("d", price=0.4),
    )
    plan = plan_of(place(RTX, 3, index))
    assert [m.node_id for m in plan.members] == ["c", "b", "d"]
    assert [m.role for m in plan.members] == ["head", "worker", "worker"]
    assert plan.hourly_micro == 900_000
    assert plan.region == "eu-west" and plan.single_region
    assert plan.price_lines() == [(300_000, 1), (200_000, 1), (400_000, 1)]


def test_equal_prices_prefer_reliability() -> None:
    index = index_of(
        cap("a", reliability=0.5), cap("b", reliability=0.8), cap("c", reliability=0.7)
    )
    plan = plan_of(place(RTX, 2, index))
    assert {m.node_id for m in plan.members} == {"b", "c"}


def test_one_member_per_node_devices_individually() -> None:
    index = index_of(cap("big", gpus=8, price=0.1), cap("small", price=0.9))
    plan = plan_of(place(RTX, 2, index))
    assert {m.node_id for m in plan.members} == {"big", "small"}
    assert isinstance(place(RTX, 3, index), PlacementFailure)
    two = plan_of(place(Requirement(options=(("rtx4090", 2),)), 1, index))
    assert two.members[0].device_ids == ("big-g0", "big-g1")
    # Allocate, and a second cluster can still use the rest of the 8-GPU host.
    index.take_plan(two)
    again = plan_of(place(RTX, 1, index))
    assert again.members[0].node_id == "big"
    assert again.members[0].device_ids == ("big-g2",)
    assert index.device_count == 7


def test_single_region_preferred_over_cheaper_mix() -> None:
    index = index_of(
        cap("e1", "eu-west", 0.1),
        cap("u1", "us-east", 0.1),
        cap("u2", "us-east", 0.5),
        cap("e2", "eu-west", 0.6),
        cap("a1", "ap-south", 0.2),
    )
    plan = plan_of(place(RTX, 2, index))
    assert plan.regions == ("us-east",)  # 0.6 in us-east beats 0.7 in eu-west
    three = plan_of(place(RTX, 3, index))  # no region has 3: cheapest mix
    assert {m.node_id for m in three.members} == {"e1", "u1", "a1"}
    assert three.region is None and len(three.regions) == 3


def test_filters() -> None:
    index = index_of(
        cap("sec", security=SecurityTier.DATACENTER, price=0.9),
        cap("fast", connectivity=ConnectivityTier.ULTRA, price=0.8),
        cap("ram", ram_gb=512, price=0.7),
        cap("rel", reliability=0.99, price=0.6),
        cap("vram", vram_gb=48, price=0.5, model="a6000"),
        cap("us", region="us-east", price=0.4),
        cap("cheap", price=0.1, reliability=0.2),
    )

    def only(req: Requirement) -> str:
        plan = plan_of(place(req, 1, index))
        return plan.members[0].node_id

    assert only(RTX) == "cheap"
    assert only(replace(RTX, security=SecurityTier.DATACENTER)) == "sec"
    assert only(replace(RTX, connectivity=ConnectivityTier.ULTRA)) == "fast"
    assert only(replace(RTX, min_ram_gb=256)) == "ram"
    assert only(replace(RTX, min_reliability=0.95)) == "rel"
    assert only(Requirement(options=(("a6000", 1),), min_vram_gb=40)) == "vram"
    assert only(replace(RTX, regions=frozenset({"us-east"}))) == "us"
    assert only(replace(RTX, max_price_micro=100_000)) == "cheap"
    assert isinstance(place(replace(RTX, max_price_micro=99_999), 1, index), PlacementFailure)
    assert only(Requirement(options=(("a6000", 1), ("rtx4090", 1)))) == "cheap"


def test_unverified_devices_and_unplaceable_nodes() -> None:
    mixed = NodeCapacity(
        "m",
        "rtx4090",
        "eu-west",
        (
            FreeDevice("m-g0", DeviceState.CLAIMED),
            FreeDevice("m-g1"),
            FreeDevice("m-g2", DeviceState.FAILED),
        ),
        price_micro=100_000,
    )
    index = index_of(
        mixed,
        cap("off", price=0.01, state=NodeState.OFFLINE),
        cap("verifying", price=0.01, state=NodeState.VERIFYING),
        cap("busy", price=0.2, gpus=2, state=NodeState.ALLOCATED),
    )
    plan = plan_of(place(RTX, 2, index))
    assert {m.node_id for m in plan.members} == {"m", "busy"}
    assert plan.members[0].device_ids in (("m-g1",), ("busy-g0",))
    assert isinstance(place(Requirement(options=(("rtx4090", 2),)), 2, index), PlacementFailure)
    assert len(index) == 2 and index.device_count == 3


def test_index_updates_and_removal() -> None:
    index = index_of(cap("a", price=0.1), cap("b", price=0.2))
    index.upsert(cap("a", price=0.9))  # price change moves it in its bucket
    assert plan_of(place(RTX, 1, index)).members[0].node_id == "b"
    index.remove("b")
    assert plan_of(place(RTX, 1, index)).members[0].node_id == "a"
    index.take("a", "rtx4090", ["a-g0"])
    assert isinstance(place(RTX, 1, index), PlacementFailure)
    index.give_back("a", "rtx4090", [FreeDevice("a-g0")])
    assert plan_of(place(RTX, 1, index)).members[0].node_id == "a"
    index.remove("a")
    index.remove("ghost")
    assert len(index) == 0 and index.device_count == 0 and index.models() == []
    assert index.get("a", "rtx4090") is None


def test_exclude_nodes_for_healing() -> None:
    index = index_of(cap("a", price=0.1), cap("b", price=0.2))
    plan = plan_of(place(RTX, 1, index, exclude_nodes={"a"}))
    assert plan.members[0].node_id == "b"


def test_cpu_members() -> None:
    index = index_of(
        cap("c1", model="cpu", price=0.01, cpus=4),
        cap("c2", model="cpu", price=0.02, cpus=32),
    )
    spec = load_spec("nodes: 1\nresources: {cpus: 8}")
    plan = plan_of(place_spec(spec, index))
    member = plan.members[0]
    assert (member.node_id, member.units, member.device_ids) == ("c2", 8, ("c2-g0",))
    assert plan.hourly_micro == 8 * 20_000
    index.take_plan(plan)
    cap_after = index.get("c2", "cpu")
    assert cap_after is not None and cap_after.cpus == 24


def test_requirement_from_spec() -> None:
    spec = load_spec(
        """
nodes: 2
resources: {gpu: [rtx4090, "a100-80gb:2"], min_vram_gb: 24, min_ram_gb: 32}
regions: [eu-west]
security: datacenter
connectivity: high
min_reliability: 0.8
max_price: 0.5
"""
    )
    req = requirement_from_spec(spec)
    assert req.options == (("rtx4090", 1), ("a100-80gb", 2))
    assert (req.min_vram_gb, req.min_ram_gb, req.min_reliability) == (24, 32, 0.8)
    assert req.regions == frozenset({"eu-west"})
    assert req.max_price_micro == 500_000
    assert req.security is SecurityTier.DATACENTER


def test_failure_names_the_binding_constraint() -> None:
    index = index_of(
        cap("e1", "eu-west", 0.2),
        cap("e2", "eu-west", 0.25),
        cap("e3", "eu-west", 0.45),
        cap("u1", "us-east", 0.1),
    )
    req = replace(RTX, regions=frozenset({"eu-west"}), max_price_micro=300_000)
    fail = place(req, 3, index)
    assert isinstance(fail, PlacementFailure)
    assert fail.feasible_nodes == 2 and fail.requested_nodes == 3
    assert fail.binding == ("max_price", "regions")
    assert fail.reason.startswith("2 of 3 nodes: not enough rtx4090 under 0.3 in eu-west")
    assert "raise max_price to 0.45" in fail.reason
    assert "add region us-east" in fail.reason

    tiers = place(replace(RTX, security=SecurityTier.CONFIDENTIAL), 1, index)
    assert isinstance(tiers, PlacementFailure)
    assert tiers.feasible_nodes == 0
    assert tiers.suggestions == ("lower security to community",)

    too_many = place(RTX, 9, index)
    assert isinstance(too_many, PlacementFailure)
    assert "only 4 node(s) with free rtx4090" in too_many.reason

    rel = place(replace(RTX, min_reliability=0.95), 1, index)
    assert isinstance(rel, PlacementFailure) and rel.binding == ("min_reliability",)
    assert "lower min_reliability to 0.9" in rel.reason


def test_offers_from_index() -> None:
    index = index_of(cap("a", price=0.3, gpus=2), cap("b", price=0.1, country="DE"))
    offers = list(index.offers())
    assert [o.node_id for o in offers] == ["b", "a"]
    assert offers[1].count == 2 and offers[0].country == "DE"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nodes"):
        place(RTX, 0, DeviceIndex())
    with pytest.raises(ValueError, match="option"):
        place(Requirement(options=()), 1, DeviceIndex())


# ----------------------------------------------------------------------------- properties

MODELS = ("rtx4090", "a100-80gb")
REGIONS = ("eu-west", "us-east", "ap-south")


@st.composite
def capacities(draw: st.DrawFn) -> list[NodeCapacity]:
    n = draw(st.integers(min_value=0, max_value=8))
    out = []
    for i in range(n):
        for model in draw(st.sets(st.sampled_from(MODELS), min_size=1, max_size=2)):
            out.append(
                cap(
                    f"n{i}",
                    region=REGIONS[draw(st.integers(0, 2))]
                    if model == MODELS[0]
                    else REGIONS[i % 3],
                    price=draw(st.sampled_from((0.1, 0.2, 0.3, 0.5))),
                    model=model,
                    gpus=draw(st.integers(1, 3)),
                    reliability=draw(st.sampled_from((0.5, 0.9))),
                    security=draw(st.sampled_from(list(SecurityTier)[:2])),
                    vram_gb=draw(st.sampled_from((24.0, 80.0))),
                )
            )
    # One region per node, whatever the model.
    region_of: dict[str, str] = {}
    return [replace(c, region=region_of.setdefault(c.node_id, c.region)) for c in out]


@st.composite
def requirements(draw: st.DrawFn) -> Requirement:
    models = draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=2, unique=True))
    return Requirement(
        options=tuple((m, draw(st.integers(1, 2))) for m in models),
        regions=frozenset(draw(st.sets(st.sampled_from(REGIONS), max_size=2))),
        max_price_micro=draw(st.sampled_from((None, 200_000, 300_000))),
        security=draw(st.sampled_from(list(SecurityTier)[:2])),
        min_vram_gb=draw(st.sampled_from((0.0, 40.0))),
    )


def oracle(caps: list[NodeCapacity], req: Requirement, n: int) -> int | None:
    """Brute force: cheapest single-region set of n nodes, else cheapest mix; None if none."""
    best_per_node: dict[str, tuple[int, str]] = {}
    for c in caps:
        free = len([d for d in c.devices if d.state is DeviceState.VERIFIED])
        for model, units in req.options:
            ok = (
                c.model == model
                and free >= units
                and (not req.regions or c.region in req.regions)
                and (req.max_price_micro is None or c.price_micro <= req.max_price_micro)
                and c.security >= req.security
                and c.vram_gb >= req.min_vram_gb
            )
            if ok:
                cost = c.price_micro * units
                if c.node_id not in best_per_node or cost < best_per_node[c.node_id][0]:
                    best_per_node[c.node_id] = (cost, c.region)
    nodes = list(best_per_node.items())
    single = [
        sum(cost for _, (cost, _) in combo)
        for combo in itertools.combinations(nodes, n)
        if len({region for _, (_, region) in combo}) == 1
    ]
    if single:
        return min(single)
    anywhere = [sum(cost for _, (cost, _) in combo) for combo in itertools.combinations(nodes, n)]
    return min(anywhere) if anywhere else None


@given(capacities(), requirements(), st.integers(min_value=1, max_value=4))
@settings(max_examples=200, deadline=None)
def test_placement_matches_brute_force(caps: list[NodeCapacity], req: Requirement, n: int) -> None:
    index = index_of(*caps)
    result = place(req, n, index)
    expected = oracle(caps, req, n)
    if expected is None:
        assert isinstance(result, PlacementFailure)
        assert result.feasible_nodes < n
        return
    assert isinstance(result, PlacementPlan), result
    assert result.hourly_micro == expected
    nodes = [m.node_id for m in result.members]
    assert len(nodes) == len(set(nodes)) == n  # never two members on one node
    assert [m.role for m in result.members] == ["head"] + ["worker"] * (n - 1)
    by_key = {(c.node_id, c.model): c for c in caps}
    for m in result.members:
        source = by_key[(m.node_id, m.model)]
        assert req.max_price_micro is None or m.price_micro <= req.max_price_micro
        assert (m.model, m.units) in req.options
        assert len(m.device_ids) == m.units
        assert set(m.device_ids) <= {d.device_id for d in source.devices}
        assert not req.regions or m.region in req.regions


@given(capacities(), requirements(), st.integers(min_value=1, max_value=4))
@settings(max_examples=150, deadline=None)
def test_pruning_bound_checked_every_row_is_still_exact(
    caps: list[NodeCapacity], req: Requirement, n: int
) -> None:
    saved = placement_module._BOUND_MASK
    placement_module._BOUND_MASK = 0
    try:
        result = place(req, n, index_of(*caps))
    finally:
        placement_module._BOUND_MASK = saved
    expected = oracle(caps, req, n)
    if expected is None:
        assert isinstance(result, PlacementFailure)
    else:
        assert isinstance(result, PlacementPlan) and result.hourly_micro == expected


def test_the_index_lives_in_placement_free_and_placement_re_exports_it() -> None:
    for name in placement_free.__all__:
        assert getattr(placement_module, name) is getattr(placement_free, name)
    index = placement_free.DeviceIndex()
    index.upsert(cap("n1", gpus=2))
    plan = place(Requirement(options=(("rtx4090", 2),)), 1, index)
    assert isinstance(plan, PlacementPlan)
    index.take_plan(plan)  # a plan of core.placement, taken by the index of placement_free
    assert index.device_count == 0
