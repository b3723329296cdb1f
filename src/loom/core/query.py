"""The offer query language (Vast-like, DESIGN.md §7).

A query is whitespace-separated conditions, all of which must hold::

    gpu=rtx4090 gpus>=2 region in [eu-west,us-east] price<=0.40 reliability>=0.9 verified=true

Grammar::

    query     := condition*            (optionally joined by the word "and")
    condition := FIELD OP value | FIELD ("in" | "notin" | "not in") "[" value ("," value)* "]"
    OP        := = | == | != | < | <= | > | >=
    value     := bare word (letters, digits, . _ - + :) | "quoted text"

Fields and their value types (``=``-only fields refuse ordering operators):

====================  ==============================================  ===============
field (aliases)       value                                            operators
====================  ==============================================  ===============
gpu (model)           device model, normalized through the catalog     = != in notin
gpus (num_gpus)       integer                                          all
vram (gpu_ram)        GB per device                                    all
cpus                  integer                                          all
ram                   GB                                               all
region                region slug (eu-west) or a continent (eu)        = != in notin
country               ISO 3166 alpha-2                                 = != in notin
price (dph)           credits per device-hour, -> micro-credits         all
reliability           0..1                                             all
verified              true/false                                       = !=
security              tier, compared by order                          all
connectivity          tier, compared by order                          all
====================  ==============================================  ===============

Errors raise :class:`QueryError`, whose message shows the query with a caret line under the
offending token, e.g.::

    price<=abc
           ^^^ expected a number of credits such as 0.40
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from loom.core.catalog import normalize_model
from loom.core.models import (
    CONTINENTS,
    ConnectivityTier,
    SecurityTier,
    validate_country,
    validate_region,
)
from loom.core.money import format_credits, parse_credits

__all__ = [
    "FIELDS",
    "Condition",
    "Offer",
    "Op",
    "Query",
    "QueryError",
    "filter_offers",
    "matches",
    "parse_query",
    "sort_offers",
]

MAX_QUERY_LENGTH = 4096


class QueryError(ValueError):
    """A query Loom cannot read; ``str()`` shows the query with a caret under the culprit."""

    def __init__(self, reason: str, text: str, pos: int, length: int = 1) -> None:
        self.reason = reason
        self.text = text
        self.pos = max(0, min(pos, len(text)))
        self.length = max(1, length)
        line = text.replace("\n", " ").replace("\t", " ")
        super().__init__(f"{line}\n{' ' * self.pos}{'^' * self.length} {reason}")


class Op(StrEnum):
    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    IN = "in"
    NOTIN = "notin"


_ORDER_OPS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE})
_COMPARE: dict[Op, Callable[[Any, Any], bool]] = {
    Op.EQ: operator.eq,
    Op.NE: operator.ne,
    Op.LT: operator.lt,
    Op.LE: operator.le,
    Op.GT: operator.gt,
    Op.GE: operator.ge,
}


@dataclass(frozen=True, slots=True)
class Offer:
    """One node's offer of free devices of one model, as search sees it."""

    node_id: str
    node_name: str
    model: str
    count: int  # free devices of ``model`` on the node (cpu: 1)
    vram_gb: float  # per device
    cpus: int
    ram_gb: float
    region: str
    country: str
    price_micro: int  # per device-hour (cpu: per core-hour)
    reliability: float  # 0..1
    verified: bool
    security: SecurityTier
    connectivity: ConnectivityTier


# ----------------------------------------------------------------------------- field table


def _parse_model(text: str) -> str:
    return normalize_model(text)


def _parse_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 0:
        raise ValueError("expected a number >= 0")
    return value


def _parse_gb(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError("expected a number of GB") from None
    if not value.is_finite() or value < 0:
        raise ValueError("expected a number of GB >= 0")
    return value


def _parse_region(text: str) -> str:
    value = text.strip().lower()
    if value in CONTINENTS:
        return value  # a whole continent
    return validate_region(value)


def _parse_price(text: str) -> int:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError("expected a number of credits such as 0.40") from None
    if value.is_finite() and value.adjusted() > 12:
        raise ValueError("price is absurdly large")
    try:
        return parse_credits(text, allow_zero=True)
    except ValueError as exc:
        if "not a number" in str(exc) or "finite" in str(exc):
            raise ValueError("expected a number of credits such as 0.40") from None
        raise


def _parse_reliability(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError("expected a number between 0 and 1") from None
    if not value.is_finite() or not 0 <= value <= 1:
        raise ValueError("expected a number between 0 and 1")
    return value


def _parse_bool(text: str) -> bool:
    value = text.lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise ValueError("expected true or false")


def _fmt_plain(value: Any) -> str:
    return str(value)


def _fmt_tier(value: Any) -> str:
    return str(value.slug)


def _fmt_bool(value: Any) -> str:
    return "true" if value else "false"


def _fmt_price(value: Any) -> str:
    return format_credits(int(value))


def _offer_region(offer: Offer) -> str:
    return offer.region


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    parse: Callable[[str], Any]
    get: Callable[[Offer], Any]
    ordered: bool
    fmt: Callable[[Any], str] = _fmt_plain


FIELDS: dict[str, _Field] = {
    f.name: f
    for f in (
        _Field("gpu", _parse_model, lambda o: o.model, False),
        _Field("gpus", _parse_int, lambda o: o.count, True),
        _Field("vram", _parse_gb, lambda o: Decimal(str(o.vram_gb)), True),
        _Field("cpus", _parse_int, lambda o: o.cpus, True),
        _Field("ram", _parse_gb, lambda o: Decimal(str(o.ram_gb)), True),
        _Field("region", _parse_region, _offer_region, False),
        _Field("country", validate_country, lambda o: o.country.upper(), False),
        _Field("price", _parse_price, lambda o: o.price_micro, True, _fmt_price),
        _Field("reliability", _parse_reliability, lambda o: Decimal(str(o.reliability)), True),
        _Field("verified", _parse_bool, lambda o: o.verified, False, _fmt_bool),
        _Field("security", SecurityTier.parse, lambda o: o.security, True, _fmt_tier),
        _Field("connectivity", ConnectivityTier.parse, lambda o: o.connectivity, True, _fmt_tier),
    )
}
_ALIASES = {
    "model": "gpu",
    "gpu_name": "gpu",
    "num_gpus": "gpus",
    "gpu_count": "gpus",
    "gpu_ram": "vram",
    "vram_gb": "vram",
    "ram_gb": "ram",
    "cpu_cores": "cpus",
    "dph": "price",
    "security_tier": "security",
}


# ----------------------------------------------------------------------------- AST


@dataclass(frozen=True, slots=True)
class Condition:
    """``field op values``; ``values`` has one item except for in / notin."""

    field: str
    op: Op
    values: tuple[Any, ...]
    pos: int = dataclasses.field(default=0, compare=False)

    def __str__(self) -> str:
        fmt = FIELDS[self.field].fmt
        if self.op in (Op.IN, Op.NOTIN):
            return f"{self.field} {self.op.value} [{','.join(fmt(v) for v in self.values)}]"
        return f"{self.field}{self.op.value}{fmt(self.values[0])}"

    def test(self, offer: Offer) -> bool:
        spec = FIELDS[self.field]
        actual = spec.get(offer)
        if self.field == "region":
            hit = any(_region_match(actual, v) for v in self.values)
            return hit if self.op in (Op.EQ, Op.IN) else not hit
        if self.op is Op.IN:
            return actual in self.values
        if self.op is Op.NOTIN:
            return actual not in self.values
        return _COMPARE[self.op](actual, self.values[0])


def _region_match(region: str, wanted: str) -> bool:
    return region == wanted or (("-" not in wanted) and region.startswith(wanted + "-"))


@dataclass(frozen=True, slots=True)
class Query:
    """Conditions, AND-ed. ``str(query)`` is the canonical text; it parses back equal."""

    conditions: tuple[Condition, ...]
    text: str = dataclasses.field(default="", compare=False)

    def __str__(self) -> str:
        return " ".join(str(c) for c in self.conditions)

    def models(self) -> frozenset[str] | None:
        """The device models the query allows for sure (``gpu=`` / ``gpu in``), else None."""
        allowed: frozenset[str] | None = None
        for cond in self.conditions:
            if cond.field == "gpu" and cond.op in (Op.EQ, Op.IN):
                values = frozenset(cond.values)
                allowed = values if allowed is None else allowed & values
        return allowed


# ----------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # word, string, op, lbrack, rbrack, comma, end
    text: str
    pos: int
    length: int


_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+:")
_OPS = ("<=", ">=", "!=", "==", "=", "<", ">")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch in "[],":
            kind = {"[": "lbrack", "]": "rbrack", ",": "comma"}[ch]
            tokens.append(_Token(kind, ch, i, 1))
            i += 1
            continue
        op = next((o for o in _OPS if text.startswith(o, i)), None)
        if op is not None:
            tokens.append(_Token("op", "=" if op == "==" else op, i, len(op)))
            i += len(op)
            continue
        if ch in "\"'":
            end = text.find(ch, i + 1)
            if end < 0:
                raise QueryError("unterminated quoted text", text, i, n - i)
            tokens.append(_Token("string", text[i + 1 : end], i, end - i + 1))
            i = end + 1
            continue
        if ch in _WORD_CHARS:
            j = i
            while j < n and text[j] in _WORD_CHARS:
                j += 1
            tokens.append(_Token("word", text[i:j], i, j - i))
            i = j
            continue
        raise QueryError(f"unexpected character {ch!r}", text, i, 1)
    tokens.append(_Token("end", "", n, 1))
    return tokens


# ----------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def fail(self, reason: str, tok: _Token) -> QueryError:
        return QueryError(reason, self.text, tok.pos, tok.length)

    def parse(self) -> Query:
        conditions: list[Condition] = []
        while self.peek().kind != "end":
            tok = self.peek()
            if tok.kind == "word" and tok.text.lower() in ("and", "&&"):
                self.take()
                continue
            conditions.append(self.condition())
        return Query(tuple(conditions), self.text)

    def condition(self) -> Condition:
        tok = self.take()
        if tok.kind != "word":
            raise self.fail("expected a field name such as gpu, price, region", tok)
        name = tok.text.lower()
        name = _ALIASES.get(name, name)
        spec = FIELDS.get(name)
        if spec is None:
            raise self.fail(f"unknown field; use one of: {', '.join(FIELDS)}", tok)
        op_tok = self.take()
        op = self.operator(op_tok)
        if op in _ORDER_OPS and not spec.ordered:
            raise self.fail(f"{name} supports =, !=, in, notin", op_tok)
        if op in (Op.IN, Op.NOTIN):
            if name == "verified":
                raise self.fail("verified supports = and !=", op_tok)
            values = self.value_list(spec)
        else:
            values = (self.value(spec),)
        return Condition(name, op, values, tok.pos)

    def operator(self, tok: _Token) -> Op:
        if tok.kind == "op":
            return Op(tok.text)
        if tok.kind == "word":
            word = tok.text.lower()
            if word == "in":
                return Op.IN
            if word == "notin":
                return Op.NOTIN
            if word == "not" and self.peek().kind == "word" and self.peek().text.lower() == "in":
                self.take()
                return Op.NOTIN
        raise self.fail("expected an operator: = != < <= > >= in notin", tok)

    def value(self, spec: _Field) -> Any:
        tok = self.take()
        if tok.kind not in ("word", "string"):
            raise self.fail(f"expected a value for {spec.name}", tok)
        try:
            return spec.parse(tok.text)
        except ValueError as exc:
            raise self.fail(str(exc), tok) from None

    def value_list(self, spec: _Field) -> tuple[Any, ...]:
        tok = self.take()
        if tok.kind != "lbrack":
            raise self.fail("expected '[' to start a list such as [eu-west,us-east]", tok)
        values: list[Any] = []
        while True:
            values.append(self.value(spec))
            sep = self.take()
            if sep.kind == "rbrack":
                break
            if sep.kind != "comma":
                raise self.fail("expected ',' or ']'", sep)
        return tuple(dict.fromkeys(values))


def parse_query(text: str) -> Query:
    """Parse a query, or raise QueryError pointing at the offending token."""
    if not isinstance(text, str):
        raise QueryError("a query must be text", "", 0)
    if len(text) > MAX_QUERY_LENGTH:
        raise QueryError(f"query longer than {MAX_QUERY_LENGTH} characters", text[:80], 80)
    return _Parser(text).parse()


# ----------------------------------------------------------------------------- evaluation


def matches(query: Query | str, offer: Offer) -> bool:
    """True when every condition of the query holds for the offer."""
    q = parse_query(query) if isinstance(query, str) else query
    return all(cond.test(offer) for cond in q.conditions)


def filter_offers(query: Query | str, offers: Iterable[Offer]) -> list[Offer]:
    q = parse_query(query) if isinstance(query, str) else query
    return [o for o in offers if matches(q, o)]


_SORT_KEYS: dict[str, tuple[Callable[[Offer], Any], bool]] = {
    # key -> (value, descending by default)
    "price": (lambda o: o.price_micro, False),
    "reliability": (lambda o: o.reliability, True),
    "vram": (lambda o: o.vram_gb, True),
    "gpus": (lambda o: o.count, True),
    "cpus": (lambda o: o.cpus, True),
    "ram": (lambda o: o.ram_gb, True),
    "security": (lambda o: int(o.security), True),
    "connectivity": (lambda o: int(o.connectivity), True),
    "region": (lambda o: o.region, False),
    "gpu": (lambda o: o.model, False),
}


def sort_offers(offers: Sequence[Offer] | Iterable[Offer], key: str = "price") -> list[Offer]:
    """Sort offers by ``key`` (price ascending; reliability, vram... descending).

    Prefix ``-`` reverses the default direction (``-price``: dearest first). Ties are broken
    by price, then higher reliability, then node id, so the order is deterministic.
    """
    name = key.strip().lower()
    flip = name.startswith("-")
    name = _ALIASES.get(name.lstrip("-+"), name.lstrip("-+"))
    if name not in _SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}; use one of: {', '.join(_SORT_KEYS)}")
    get, descending = _SORT_KEYS[name]
    ordered = sorted(offers, key=lambda o: (o.price_micro, -o.reliability, o.node_id))
    return sorted(ordered, key=get, reverse=descending != flip)
