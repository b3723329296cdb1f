"""Reliability score: bounds, the neutral prior, and monotonicity in every kind of evidence."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from loom.core import reliability as r
from loom.core.reliability import ChallengeResult, ReliabilityInputs

EPS = 1e-12
DAY = 86_400.0

challenges = st.lists(
    st.builds(ChallengeResult, age_s=st.floats(0, 365 * DAY), passed=st.booleans()), max_size=30
).map(tuple)


@st.composite
def inputs(draw: st.DrawFn) -> ReliabilityInputs:
    observed = draw(st.floats(0, 90 * DAY))
    online = draw(st.floats(0, 1)) * observed
    gaps = draw(st.integers(0, 100_000))
    return ReliabilityInputs(
        observed_s=observed,
        online_s=online,
        heartbeat_interval_s=draw(st.sampled_from([15.0, 30.0, 60.0])),
        heartbeat_gaps=gaps,
        heartbeat_gap_p95_s=draw(st.none() | st.floats(0, 10 * DAY)),
        challenges=draw(challenges),
        members_completed=draw(st.integers(0, 1000)),
        members_lost=draw(st.integers(0, 1000)),
    )


def test_new_node_scores_one_half() -> None:
    b = r.breakdown(ReliabilityInputs())
    assert (b.uptime, b.heartbeat, b.challenge, b.cluster) == (0.5, 0.5, 0.5, 0.5)
    assert b.score == pytest.approx(0.5, abs=1e-12)
    assert sum(r.WEIGHTS.values()) == pytest.approx(1.0)


def test_a_solid_node_scores_high_and_a_cheat_low() -> None:
    solid = ReliabilityInputs(
        observed_s=30 * DAY,
        online_s=29.9 * DAY,
        heartbeat_gaps=43_000,
        heartbeat_gap_p95_s=61.0,
        challenges=tuple(ChallengeResult(age_s=i * DAY, passed=True) for i in range(30)),
        members_completed=40,
        members_lost=0,
    )
    assert r.score(solid) > 0.9
    cheat = dataclasses.replace(
        solid, challenges=tuple(ChallengeResult(age_s=i * 3600.0, passed=False) for i in range(5))
    )
    assert r.score(cheat) < r.score(solid) - 0.3
    assert r.breakdown(cheat).challenge < 0.15
    flaky = ReliabilityInputs(
        observed_s=30 * DAY,
        online_s=10 * DAY,
        heartbeat_gaps=10_000,
        heartbeat_gap_p95_s=900.0,
        members_completed=2,
        members_lost=10,
    )
    assert r.score(flaky) < 0.3


@given(inputs())
def test_score_is_in_unit_interval(x: ReliabilityInputs) -> None:
    b = r.breakdown(x)
    for value in (b.uptime, b.heartbeat, b.challenge, b.cluster, b.score):
        assert 0.0 < value <= 1.0


@given(inputs(), st.floats(0, 1))
def test_more_uptime_never_lowers(x: ReliabilityInputs, frac: float) -> None:
    online = min(x.observed_s, x.online_s + (x.observed_s - x.online_s) * frac)
    more_online = dataclasses.replace(x, online_s=online)
    assert r.score(more_online) >= r.score(x) - EPS


@given(inputs(), st.floats(0, 30 * DAY))
def test_more_time_spent_online_never_lowers(x: ReliabilityInputs, extra: float) -> None:
    longer = dataclasses.replace(x, observed_s=x.observed_s + extra, online_s=x.online_s + extra)
    assert r.score(longer) >= r.score(x) - EPS


@given(inputs(), st.floats(0, 30 * DAY))
def test_more_downtime_never_raises(x: ReliabilityInputs, extra: float) -> None:
    longer = dataclasses.replace(x, observed_s=x.observed_s + extra)
    assert r.score(longer) <= r.score(x) + EPS


@given(inputs(), st.floats(0, 365 * DAY))
def test_a_failed_challenge_never_raises_and_a_pass_never_lowers(
    x: ReliabilityInputs, age: float
) -> None:
    failed = dataclasses.replace(x, challenges=(*x.challenges, ChallengeResult(age, False)))
    passed = dataclasses.replace(x, challenges=(*x.challenges, ChallengeResult(age, True)))
    assert r.score(failed) <= r.score(x) + EPS
    assert r.score(passed) >= r.score(x) - EPS


@given(inputs(), st.floats(0, 100 * DAY), st.floats(0, 100 * DAY))
def test_recent_failures_hurt_more_than_old_ones(x: ReliabilityInputs, a: float, b: float) -> None:
    recent, old = min(a, b), max(a, b)
    with_recent = dataclasses.replace(x, challenges=(*x.challenges, ChallengeResult(recent, False)))
    with_old = dataclasses.replace(x, challenges=(*x.challenges, ChallengeResult(old, False)))
    assert r.score(with_recent) <= r.score(with_old) + EPS


@given(inputs(), st.integers(1, 50))
def test_lost_members_never_raise_and_completed_never_lower(x: ReliabilityInputs, k: int) -> None:
    assert r.score(dataclasses.replace(x, members_lost=x.members_lost + k)) <= r.score(x) + EPS
    completed = dataclasses.replace(x, members_completed=x.members_completed + k)
    assert r.score(completed) >= r.score(x) - EPS


@given(inputs(), st.floats(0, DAY))
def test_longer_heartbeat_gaps_never_raise(x: ReliabilityInputs, extra: float) -> None:
    assume(x.heartbeat_gap_p95_s is not None)
    assert x.heartbeat_gap_p95_s is not None
    worse = dataclasses.replace(x, heartbeat_gap_p95_s=x.heartbeat_gap_p95_s + extra)
    assert r.score(worse) <= r.score(x) + EPS


def test_recency_weight_halves() -> None:
    assert r.recency_weight(0) == 1.0
    assert r.recency_weight(r.CHALLENGE_HALF_LIFE_S) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"observed_s": -1.0},
        {"observed_s": 10.0, "online_s": 11.0},
        {"observed_s": float("nan")},
        {"heartbeat_interval_s": 0.0},
        {"heartbeat_gap_p95_s": -1.0},
        {"members_lost": -1},
        {"challenges": (ChallengeResult(-1.0, True),)},
    ],
)
def test_invalid_inputs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"must|cannot"):
        ReliabilityInputs(**kwargs)  # type: ignore[arg-type]
