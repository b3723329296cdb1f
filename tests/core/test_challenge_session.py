"""The verifier's sans-IO state machine and the wire messages, without a real prover."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from loom.core.challenge import (
    ChallengeSpec,
    ChallengeStart,
    ChallengeStateError,
    NonceRelease,
    OpeningsResponse,
    RootCommit,
    SessionState,
    VerifierSession,
    params_for,
    root_statement,
)

PARAMS = params_for("test")


def _pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _entropy(seed: int = 7) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


class FakeProver:
    """Signs arbitrary roots: enough to drive the session's timing and signature logic."""

    def __init__(self, key: Ed25519PrivateKey, start: ChallengeStart) -> None:
        self.key = key
        self.cid = start.spec.challenge_id
        self.nonces = {n.round: n.nonce for n in start.nonces}

    def commit(self, r: int, root: bytes | None = None) -> RootCommit:
        root = root if root is not None else bytes([r]) * 32
        sig = self.key.sign(root_statement(self.cid, r, self.nonces[r], root))
        return RootCommit(challenge_id=self.cid, round=r, root=root, signature=sig)

    def learn(self, release: NonceRelease | None) -> None:
        if release is not None:
            self.nonces[release.round] = release.nonce


def _session(key: Ed25519PrivateKey) -> tuple[VerifierSession, FakeProver]:
    s = VerifierSession(PARAMS, "dev-1", _pub(key), entropy=_entropy())
    return s, FakeProver(key, s.start(now=100.0))


def _all_roots(s: VerifierSession, fp: FakeProver, dt: float = 0.1) -> None:
    for r in range(PARAMS.rounds):
        fp.learn(s.on_commit(fp.commit(r), arrival_time=100.0 + (r + 1) * dt))


def test_start_releases_depth_nonces_and_binds_the_spec() -> None:
    key = Ed25519PrivateKey.generate()
    s = VerifierSession(PARAMS, "dev-1", _pub(key), entropy=_entropy())
    start = s.start(now=5.0)
    assert [n.round for n in start.nonces] == list(range(PARAMS.depth))
    assert start.spec.challenge_id == s.challenge_id
    assert s.deadline == pytest.approx(5.0 + PARAMS.hard_timeout_s)
    with pytest.raises(ChallengeStateError):
        s.start(now=6.0)


def test_nonces_are_released_one_round_at_a_time() -> None:
    key = Ed25519PrivateKey.generate()
    s, fp = _session(key)
    for r in range(PARAMS.rounds):
        release = s.on_commit(fp.commit(r), arrival_time=101.0 + r)
        if r + PARAMS.depth < PARAMS.rounds:
            assert release is not None
            assert release.round == r + PARAMS.depth
        else:
            assert release is None
        fp.learn(release)
    assert s.state is SessionState.AWAITING_OPENINGS
    assert s.score is not None


def test_root_signed_by_another_key_fails_at_once() -> None:
    s, fp = _session(Ed25519PrivateKey.generate())
    fp.key = Ed25519PrivateKey.generate()
    assert s.on_commit(fp.commit(0), arrival_time=101.0) is None
    assert s.result is not None
    assert not s.result.passed
    assert "not signed by the node's key" in s.result.reason
    assert s.state is SessionState.DONE
    fp.nonces[1] = bytes(16)
    assert s.on_commit(fp.commit(1), arrival_time=102.0) is None  # ignored afterwards


def test_replayed_commit_from_another_challenge_fails() -> None:
    key = Ed25519PrivateKey.generate()
    _s1, fp1 = _session(key)
    old = fp1.commit(0)
    s2 = VerifierSession(PARAMS, "dev-1", _pub(key), entropy=_entropy(8))
    s2.start(now=0.0)
    s2.on_root(old.round, old.root, old.signature, arrival_time=1.0)
    assert s2.result is not None
    assert "not signed" in s2.result.reason
    s3 = VerifierSession(PARAMS, "dev-1", _pub(key), entropy=_entropy(9))
    s3.start(now=0.0)
    s3.on_commit(old, arrival_time=1.0)
    assert s3.result is not None
    assert "another challenge" in s3.result.reason


def test_out_of_order_root_fails() -> None:
    s, fp = _session(Ed25519PrivateKey.generate())
    fp.nonces[1] = b"\x00" * 16
    s.on_commit(fp.commit(1), arrival_time=101.0)
    assert s.result is not None
    assert "round 0 expected" in s.result.reason


def test_hard_timeout_on_arrival_and_by_polling() -> None:
    s, fp = _session(Ed25519PrivateKey.generate())
    late = 100.0 + PARAMS.hard_timeout_s + 1
    assert s.check_timeout(now=101.0) is None
    s.on_commit(fp.commit(0), arrival_time=late)
    assert s.result is not None
    assert "timed out" in s.result.reason
    s2, _ = _session(Ed25519PrivateKey.generate())
    result = s2.check_timeout(now=late)
    assert result is not None
    assert "0 of 6 roots" in result.reason


def test_caller_misuse_raises() -> None:
    key = Ed25519PrivateKey.generate()
    s = VerifierSession(PARAMS, "dev-1", _pub(key), entropy=_entropy())
    with pytest.raises(ChallengeStateError):
        s.on_root(0, b"\x00" * 32, b"\x00" * 64, 1.0)
    with pytest.raises(ChallengeStateError):
        s.draw_openings()
    s, fp = _session(key)
    fp.learn(s.on_commit(fp.commit(0), arrival_time=105.0))
    with pytest.raises(ChallengeStateError, match="monotonic"):
        s.on_commit(fp.commit(1), arrival_time=104.0)
    with pytest.raises(ChallengeStateError):
        s.verify_openings([])
    with pytest.raises(ValueError, match="32-byte"):
        VerifierSession(PARAMS, "dev-1", b"short")


def test_openings_are_distinct_and_weighted_to_the_best_window() -> None:
    s, fp = _session(Ed25519PrivateKey.generate())
    # Rounds 3..5 are fast: that is the window the in-window openings must land in.
    times = [1.0, 2.0, 3.0, 4.0, 4.1, 4.2]
    for r, t in enumerate(times):
        fp.learn(s.on_commit(fp.commit(r), arrival_time=100.0 + t))
    assert s.score is not None
    assert list(s.score.rounds) == [3, 4, 5]
    req = s.draw_openings()
    keys = [(q.round, q.tile_row, q.tile_col) for q in req.openings]
    assert len(keys) == PARAMS.openings == len(set(keys))
    assert all(q.round in (4, 5) or q.round == 3 for q in req.openings[: PARAMS.openings_in_window])
    assert s.draw_openings() == req  # idempotent: the draw happens once


def test_incomplete_or_padded_answers_fail() -> None:
    s, fp = _session(Ed25519PrivateKey.generate())
    _all_roots(s, fp)
    s.draw_openings()
    result = s.verify_openings(OpeningsResponse(challenge_id=s.challenge_id, openings=[]))
    assert not result.passed
    assert "missing" in result.reason
    assert s.verify_openings([]) is result  # DONE: same result


def test_abort_records_reason() -> None:
    s, _ = _session(Ed25519PrivateKey.generate())
    result = s.abort("agent disconnected")
    assert not result.passed
    assert result.reason == "failed: agent disconnected"


def test_messages_round_trip_as_json_with_hex_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    s = VerifierSession(PARAMS, "dev-1", _pub(key), entropy=_entropy())
    start = s.start(now=0.0)
    wire = json.dumps(start.model_dump(mode="json"))
    data = json.loads(wire)
    assert data["spec"]["seed0"] == start.spec.seed0.hex()
    assert data["spec"]["params"]["device_class"] == "test"
    assert ChallengeStart.model_validate(data) == start
    with pytest.raises(ValidationError, match="challenge_id does not match"):
        ChallengeSpec.model_validate({**data["spec"], "device_id": "dev-2"})
    bad = dict(data["nonces"][0], nonce="zz" * 16)
    with pytest.raises(ValidationError, match="hex"):
        NonceRelease.model_validate(bad)
    with pytest.raises(ValidationError, match="expected 16 bytes"):
        NonceRelease.model_validate(dict(data["nonces"][0], nonce="00" * 15))
    schema = RootCommit.model_json_schema()
    assert schema["properties"]["root"]["maxLength"] == 64
