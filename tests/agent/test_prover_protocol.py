"""End to end: NumPy prover against the verifier session — honest, slow, lazy and cheating."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from loom.agent.prover import NumpyProver, Prover, ProverError, make_prover
from loom.core.challenge import (
    ChallengeParams,
    ChallengeResult,
    Opening,
    OpeningsResponse,
    VerifierSession,
    best_window,
    params_for,
    round_seed,
    verify_evidence,
)
from loom.core.challenge.digest import DigestArray

TEST = params_for("test")


def _pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


Clock = Callable[[int], float]
"""Arrival time of root r (None: read the real monotonic clock)."""


def run(
    params: ChallengeParams,
    make: Callable[..., Prover] = NumpyProver,
    *,
    clock: Clock | None = None,
    key: Ed25519PrivateKey | None = None,
    signer: Ed25519PrivateKey | None = None,
    seed: int = 1,
    tamper: Callable[[list[Opening]], list[Opening]] | None = None,
) -> tuple[VerifierSession, Prover, ChallengeResult]:
    """Drive one whole challenge through the wire format (JSON both ways)."""
    key = key or Ed25519PrivateKey.generate()
    rng = random.Random(seed)
    session = VerifierSession(params, "dev-1", _pub(key), entropy=rng.randbytes)
    start = session.start(now=time.monotonic() if clock is None else 0.0)
    start = type(start).model_validate_json(start.model_dump_json())
    prover = make(start.spec, (signer or key).sign)
    prover.add_start(start)
    while not prover.done and session.result is None:
        commit = prover.prove_next()
        assert commit is not None, "the verifier must always have released the next nonce"
        t = time.monotonic() if clock is None else clock(commit.round)
        release = session.on_commit(type(commit).model_validate_json(commit.model_dump_json()), t)
        if release is not None:
            prover.add_nonce(release)
    if session.result is not None:
        return session, prover, session.result
    request = session.draw_openings()
    response = prover.answer(request)
    openings = list(response.openings)
    if tamper is not None:
        openings = tamper(openings)
    response = OpeningsResponse(challenge_id=response.challenge_id, openings=openings)
    wire = OpeningsResponse.model_validate(json.loads(json.dumps(response.model_dump(mode="json"))))
    return session, prover, session.verify_openings(wire)


def paced(params: ChallengeParams, rate: float) -> Clock:
    """Root r arrives as if computed at ``rate`` ops/s after 1 s of latency."""
    return lambda r: 1.0 + (r + 1) * params.ops_per_round / rate


# ---------------------------------------------------------------- honest
def test_honest_cpu_prover_passes_with_real_timing() -> None:
    _, _, result = run(TEST)
    assert result.passed, result.reason
    assert result.reason.startswith("passed: best 3-round window")
    assert result.openings_checked == TEST.openings
    assert result.measured_rate is not None
    assert result.measured_rate > TEST.required_rate
    assert not result.evidence


def test_honest_prover_passes_the_cpu_class_at_a_simulated_cpu_rate() -> None:
    """The real ``cpu`` parameters, timed as a 2-core VM runs them (≈ 25 GOPS)."""
    cpu = params_for("cpu").replace(rounds=6, window=4)  # fewer rounds: test time only
    _, _, result = run(cpu, clock=paced(cpu, 25e9))
    assert result.passed, result.reason
    assert result.measured_rate == pytest.approx(25e9)


def test_make_prover_falls_back_to_numpy_without_cuda() -> None:
    key = Ed25519PrivateKey.generate()
    session = VerifierSession(TEST, "dev-1", _pub(key))
    prover = make_prover(session.start(now=0.0).spec, key.sign)
    assert prover.backend in {"numpy", "torch"}


# ---------------------------------------------------------------- claimed GPU, CPU speed
def test_cpu_claiming_an_h100_fails_timing_with_real_clock() -> None:
    """The h100-sxm thresholds on shapes a CPU can finish: the CPU is far too slow."""
    fake_h100 = params_for("h100-sxm").replace(
        m=128,
        n=128,
        k=512,
        tile=16,
        rounds=8,
        window=4,
        depth=2,
        openings=8,
        openings_in_window=4,
    )
    _, _, result = run(fake_h100)
    assert not result.passed
    assert not result.timing_passed
    assert result.openings_failed == 0  # it did the work, just not fast enough
    assert "too slow for h100-sxm" in result.reason
    assert result.measured_rate is not None
    assert result.measured_rate < 1e-3 * fake_h100.required_rate


def test_cpu_rate_at_full_h100_shapes_fails_timing() -> None:
    """Arrival times a 25 GOPS CPU would produce on the real h100-sxm shapes (simulated:
    one round would take ≈ 1.6 h here), checked against the session's timing rule."""
    h100 = params_for("h100-sxm")
    session = VerifierSession(h100, "dev-1", _pub(Ed25519PrivateKey.generate()))
    session.start(now=0.0)
    arrivals = [paced(h100, 25e9)(r) for r in range(h100.rounds)]
    assert arrivals[1] > session.deadline  # type: ignore[operator]
    score = best_window(arrivals, h100.window, h100.ops_per_round)
    assert score is not None
    assert score.rate < h100.required_rate / 1000
    assert h100.fake_pass_bound(25e9) < 1e-200


def test_slow_window_fails_but_one_clean_window_is_enough() -> None:
    slow = paced(TEST, TEST.required_rate * 0.8)
    _, _, result = run(TEST, clock=slow)
    assert not result.passed
    assert "only ran at" in result.reason

    def stall_then_fast(r: int) -> float:  # rounds 0..2 stalled, 3..5 at the reference
        return 5.0 * min(r, 2) + (max(r, 2) - 2) * TEST.ops_per_round / TEST.reference_rate

    _, _, result = run(TEST, clock=stall_then_fast)
    assert result.passed, result.reason


# ---------------------------------------------------------------- lazy prover
class LazyProver(NumpyProver):
    """Computes only a fraction ``f`` of each round's tiles; random digests for the rest."""

    def __init__(self, *args: object, f: float, seed: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.f = f
        self.rng = np.random.default_rng(seed)

    def round_digests(self, rseed: bytes, round_index: int) -> DigestArray:
        honest = super().round_digests(rseed, round_index)
        skip = self.rng.random(honest.shape[:2]) >= self.f
        garbage = self.rng.integers(0, 2**32, size=honest.shape, dtype=np.uint64)
        honest[skip] = garbage[skip].astype(np.uint32)
        return honest


def _binomial_two_sided_p(successes: int, n: int, p: float) -> float:
    pmf = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
    observed = pmf[successes]
    return min(1.0, sum(q for q in pmf if q <= observed * (1 + 1e-9)))


def test_lazy_prover_pass_rate_matches_f_to_the_k() -> None:
    f, trials = 0.8, 300
    on_time = paced(TEST, TEST.reference_rate)
    passes = 0
    evidence_checked = 0
    for t in range(trials):

        def lazy(spec: object, sign: object, t: int = t) -> Prover:
            return LazyProver(spec, sign, f=f, seed=10_000 + t)

        _, _, result = run(TEST, lazy, clock=on_time, seed=t)
        if result.passed:
            passes += 1
            continue
        assert result.timing_passed
        assert result.evidence, "every wrong opening here is under a signed root"
        if evidence_checked < 3:
            ok, why = verify_evidence(result.evidence[0].model_dump_json())
            assert ok, why
            evidence_checked += 1
    expected = f**TEST.openings  # ≈ 0.168
    p_value = _binomial_two_sided_p(passes, trials, expected)
    assert p_value > 1e-4, f"{passes}/{trials} passed; f^k = {expected:.3f} (p = {p_value:.2g})"


def test_very_lazy_prover_fails() -> None:
    on_time = paced(TEST, TEST.reference_rate)

    def lazy(spec: object, sign: object) -> Prover:
        return LazyProver(spec, sign, f=0.25, seed=3)

    _, _, result = run(TEST, lazy, clock=on_time)
    assert not result.passed
    assert "openings wrong" in result.reason
    assert result.openings_failed >= 1


# ---------------------------------------------------------------- cheats
class PrecomputedProver(NumpyProver):
    """Commits work for nonces it guessed (or computed before the real nonce arrived)."""

    def round_digests(self, rseed: bytes, round_index: int) -> DigestArray:
        guessed = round_seed(self.spec.challenge_id, self.spec.seed0, round_index, bytes(16))
        return super().round_digests(guessed, round_index)


def test_precomputed_root_for_another_nonce_is_rejected_with_evidence() -> None:
    _, _, result = run(TEST, PrecomputedProver, clock=paced(TEST, TEST.reference_rate))
    assert not result.passed
    assert result.openings_failed == TEST.openings
    ok, why = verify_evidence(result.evidence[0].model_dump(mode="json"))
    assert ok, why
    assert why.startswith("proven:")


class SwappingProver(NumpyProver):
    """Computes one tile per pair and commits it in both places (tile j's digest at i)."""

    def round_digests(self, rseed: bytes, round_index: int) -> DigestArray:
        d = super().round_digests(rseed, round_index)
        d[:, 1::2] = d[:, 0::2]
        return d


def test_swapped_tile_in_commitment_is_rejected() -> None:
    _, _, result = run(
        TEST.replace(openings=40, openings_in_window=20),
        SwappingProver,
        clock=paced(TEST, TEST.reference_rate),
    )
    assert not result.passed
    assert result.evidence
    assert all(ev.opening.tile_col % 2 == 1 for ev in result.evidence)


def test_opening_answered_with_another_tile_is_rejected() -> None:
    def answer_with_neighbour(openings: list[Opening]) -> list[Opening]:
        first, other = openings[0], openings[1]
        swapped = first.model_copy(update={"leaf": other.leaf, "path": other.path})
        return [swapped, *openings[1:]]

    _, _, result = run(TEST, tamper=answer_with_neighbour, clock=paced(TEST, 1e9))
    assert not result.passed
    assert result.openings_failed >= 1


def test_tampered_merkle_path_is_rejected_without_evidence() -> None:
    def flip(openings: list[Opening]) -> list[Opening]:
        op = openings[0]
        path = list(op.path)
        path[0] = bytes([path[0][0] ^ 1]) + path[0][1:]
        return [op.model_copy(update={"path": path}), *openings[1:]]

    _, _, result = run(TEST, tamper=flip, clock=paced(TEST, 1e9))
    assert not result.passed
    assert "Merkle path does not lead to the signed root" in result.reason
    assert not result.evidence  # an unsigned bad path proves nothing to third parties


def test_tampered_leaf_and_unrequested_openings_are_rejected() -> None:
    def edit_leaf(openings: list[Opening]) -> list[Opening]:
        op = openings[0]
        leaf = bytes([op.leaf[0] ^ 0xFF]) + op.leaf[1:]
        return [op.model_copy(update={"leaf": leaf}), *openings[1:]]

    _, _, result = run(TEST, tamper=edit_leaf, clock=paced(TEST, 1e9))
    assert not result.passed
    assert "Merkle path" in result.reason

    def relabel(openings: list[Opening]) -> list[Opening]:
        op = openings[0]
        return [op.model_copy(update={"tile_col": (op.tile_col + 1) % 8}), *openings[1:]]

    _, _, result = run(TEST, tamper=relabel, clock=paced(TEST, 1e9))
    assert not result.passed
    assert "protocol" in result.reason


def test_root_signed_by_another_key_is_rejected() -> None:
    _, prover, result = run(TEST, signer=Ed25519PrivateKey.generate(), clock=paced(TEST, 1e9))
    assert not result.passed
    assert "not signed by the node's key" in result.reason
    assert prover.next_round == 1  # stopped after the first root


# ---------------------------------------------------------------- evidence
def test_evidence_survives_json_and_resists_tampering() -> None:
    _, _, result = run(TEST, PrecomputedProver, clock=paced(TEST, TEST.reference_rate))
    text = result.evidence[0].model_dump_json()
    assert "pickle" not in text
    assert verify_evidence(text)[0]
    data = json.loads(text)

    def variant(edit: Callable[[dict[str, object]], None]) -> tuple[bool, str]:
        d = json.loads(text)
        edit(d)
        return verify_evidence(json.dumps(d))

    other_key = _pub(Ed25519PrivateKey.generate()).hex()
    ok, why = variant(lambda d: d.__setitem__("node_public_key", other_key))
    assert not ok
    assert "signature does not verify" in why
    ok, why = variant(lambda d: d.__setitem__("nonce", "00" * 16))
    assert not ok
    ok, why = variant(lambda d: d["spec"].__setitem__("seed0", "11" * 16))  # type: ignore[index]
    assert not ok
    assert "not valid evidence" in why
    ok, why = variant(lambda d: d["opening"].__setitem__("path", []))  # type: ignore[index]
    assert not ok
    assert "Merkle path" in why
    assert verify_evidence("{not json")[0] is False
    assert verify_evidence("[]")[0] is False
    assert data["kind"] == "loom.hardware-challenge.evidence/v1"


def test_a_correct_opening_is_not_evidence() -> None:
    session, prover, result = run(TEST, clock=paced(TEST, 1e9))
    assert result.passed
    q = session.draw_openings().openings[0]
    fake = {
        "spec": session.spec.model_dump(mode="json"),
        "node_public_key": session.node_public_key.hex(),
        "nonce": session._nonces[q.round].hex(),
        "root": session._commits[q.round].root.hex(),
        "signature": session._commits[q.round].signature.hex(),
        "opening": prover.open(q.round, q.tile_row, q.tile_col).model_dump(mode="json"),
        "claimed_digest": "00" * 8,
        "true_digest": "00" * 8,
    }
    ok, why = verify_evidence(fake)
    assert not ok
    assert "correct one" in why


# ---------------------------------------------------------------- prover errors
def test_prover_refuses_out_of_order_and_unknown_requests() -> None:
    key = Ed25519PrivateKey.generate()
    session = VerifierSession(TEST, "dev-1", _pub(key))
    start = session.start(now=0.0)
    prover = NumpyProver(start.spec, key.sign)
    assert prover.prove_next() is None  # no nonce yet
    prover.add_start(start)
    with pytest.raises(ProverError, match="in order"):
        prover.compute_round(3)
    with pytest.raises(ProverError, match="not computed"):
        prover.open(0, 0, 0)
    prover.prove_next()
    with pytest.raises(ProverError, match="outside"):
        prover.open(0, 99, 0)
    other = VerifierSession(TEST, "dev-2", _pub(key)).start(now=0.0)
    with pytest.raises(ProverError, match="another challenge"):
        prover.add_start(other)
    prover.discard()
    with pytest.raises(ProverError):
        prover.open(0, 0, 0)
