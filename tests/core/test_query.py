from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.core.models import ConnectivityTier, SecurityTier
from loom.core.query import (
    Offer,
    Op,
    QueryError,
    filter_offers,
    matches,
    parse_query,
    sort_offers,
)

BASE = Offer(
    node_id="n1",
    node_name="box-1",
    model="rtx4090",
    count=2,
    vram_gb=24,
    cpus=16,
    ram_gb=64,
    region="eu-west",
    country="DE",
    price_micro=350_000,
    reliability=0.95,
    verified=True,
    security=SecurityTier.COMMUNITY,
    connectivity=ConnectivityTier.HIGH,
)


def test_parse_example_typed() -> None:
    q = parse_query(
        "gpu=rtx4090 gpus>=2 region in [eu-west,us-east] price<=0.40 reliability>=0.9 verified=true"
    )
    got = [(c.field, c.op, c.values) for c in q.conditions]
    assert got == [
        ("gpu", Op.EQ, ("rtx4090",)),
        ("gpus", Op.GE, (2,)),
        ("region", Op.IN, ("eu-west", "us-east")),
        ("price", Op.LE, (400_000,)),
        ("reliability", Op.GE, (Decimal("0.9"),)),
        ("verified", Op.EQ, (True,)),
    ]
    assert matches(q, BASE)
    assert q.models() == frozenset({"rtx4090"})
    assert parse_query("").conditions == ()
    assert parse_query("price<1").models() is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ('gpu="NVIDIA GeForce RTX 4090"', True),
        ("gpu=a100-80gb", False),
        ("gpu!=a100-80gb", True),
        ("gpu notin [a100-80gb, h100-sxm]", True),
        ("gpu not in [rtx4090]", False),
        ("gpus>2", False),
        ("gpus==2", True),
        ("vram>=24 ram>=64 cpus>=16", True),
        ("vram>24", False),
        ("region=eu", True),
        ("region in [us,ap]", False),
        ("region!=eu-west", False),
        ("country=de", True),
        ("country in [US,FR]", False),
        ("price<0.35", False),
        ("price<=0.35", True),
        ("reliability>0.95", False),
        ("verified=false", False),
        ("verified!=no", True),
        ("security>=community", True),
        ("security>=datacenter", False),
        ("connectivity>medium", True),
        ("connectivity>=ultra", False),
        ("dph<=1 num_gpus>=1 and gpu_ram>=16", True),
    ],
)
def test_matches(query: str, expected: bool) -> None:
    assert matches(query, BASE) is expected


@pytest.mark.parametrize(
    ("query", "caret", "message"),
    [
        ("price<=abc", "       ^^^", "expected a number of credits"),
        ("gpu>rtx4090", "   ^", "gpu supports =, !=, in, notin"),
        ("foo=1", "^^^", "unknown field"),
        ("gpu=rtx4091", "    ^^^^^^^", "did you mean rtx4090"),
        ("region in [eu-west", "                  ^", "expected ',' or ']'"),
        ("region in eu-west", "          ^^^^^^^", "expected '['"),
        ("price", "     ^", "expected an operator"),
        ('gpu="abc', "    ^^^^", "unterminated"),
        ("gpus>=2 x ^ y", "          ^", "unexpected character"),
        ("reliability>=2", "             ^", "between 0 and 1"),
        ("region=europe", "       ^^^^^^", "invalid region"),
        ("verified in [true]", "         ^^", "verified supports = and !="),
        ("security>=top", "          ^^^", "unknown security tier"),
        ("price<=-1", "       ^^", "must be positive"),
    ],
)
def test_errors_point_at_the_token(query: str, caret: str, message: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_query(query)
    lines = str(info.value).split("\n")
    assert lines[0] == query
    assert lines[1].startswith(caret + " ")
    assert message in lines[1]
    assert isinstance(info.value, ValueError)


def test_caret_example_from_the_brief() -> None:
    with pytest.raises(QueryError) as info:
        parse_query("price<=abc")
    assert str(info.value) == "price<=abc\n       ^^^ expected a number of credits such as 0.40"
    assert (info.value.pos, info.value.length) == (7, 3)


def test_filter_and_sort() -> None:
    offers = [
        replace(BASE, node_id="a", price_micro=300_000, reliability=0.5),
        replace(BASE, node_id="b", price_micro=300_000, reliability=0.9),
        replace(BASE, node_id="c", price_micro=100_000, reliability=0.7, verified=False),
        replace(BASE, node_id="d", price_micro=900_000, reliability=0.99, vram_gb=80),
    ]
    assert [o.node_id for o in sort_offers(offers, "price")] == ["c", "b", "a", "d"]
    assert [o.node_id for o in sort_offers(offers, "-price")] == ["d", "b", "a", "c"]
    assert [o.node_id for o in sort_offers(offers, "reliability")] == ["d", "b", "c", "a"]
    assert sort_offers(offers, "vram")[0].node_id == "d"
    assert [o.node_id for o in filter_offers("verified=true price<0.5", offers)] == ["a", "b"]
    with pytest.raises(ValueError, match="cannot sort by"):
        sort_offers(offers, "colour")


# ----------------------------------------------------------------------------- properties

_VALUES = {
    "gpu": ["rtx4090", "a100-80gb", "h100-sxm", "l4", "cpu"],
    "gpus": ["0", "1", "2", "8"],
    "vram": ["0", "16", "24.5", "80"],
    "cpus": ["1", "16"],
    "ram": ["8", "64.25"],
    "region": ["eu-west", "us-east", "eu", "ap-south"],
    "country": ["DE", "us"],
    "price": ["0", "0.4", "1.25", "0.000001"],
    "reliability": ["0", "0.5", "0.99", "1"],
    "verified": ["true", "false"],
    "security": ["community", "datacenter", "confidential"],
    "connectivity": ["low", "medium", "high", "ultra"],
}
_UNORDERED = {"gpu", "region", "country", "verified"}


@st.composite
def conditions(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(sorted(_VALUES)))
    values = _VALUES[name]
    ops = ["=", "!="] if name in _UNORDERED else ["=", "!=", "<", "<=", ">", ">="]
    if name != "verified":
        ops += ["in", "notin"]
    op = draw(st.sampled_from(ops))
    if op in ("in", "notin"):
        items = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3))
        return f"{name} {op} [{', '.join(items)}]"
    return f"{name}{op}{draw(st.sampled_from(values))}"


@given(st.lists(conditions(), max_size=6))
@settings(max_examples=150, deadline=None)
def test_canonical_text_round_trips(parts: list[str]) -> None:
    q = parse_query("  ".join(parts))
    again = parse_query(str(q))
    assert again == q
    assert str(again) == str(q)
    assert matches(q, BASE) == matches(again, BASE)


_ALPHABET = st.sampled_from(list("gpuricevdsty=!<>[],\"' -.0123456789_:abnotinxX\t"))


@given(st.one_of(st.text(max_size=60), st.text(alphabet=_ALPHABET, max_size=60)))
@settings(max_examples=250, deadline=None)
def test_arbitrary_text_raises_only_query_error(text: str) -> None:
    error: QueryError | None = None
    try:
        q = parse_query(text)
    except QueryError as exc:
        error = exc
    if error is None:
        assert isinstance(matches(q, BASE), bool)
    else:
        assert 0 <= error.pos <= len(text)
        assert "^" in str(error)
