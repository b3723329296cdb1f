"""The hardware challenge (``docs/hardware-challenge.md``): pure math and a sans-IO verifier.

An exact INT8×INT8→INT32 matrix-product workload generated from coordinator nonces,
committed round by round with signed Merkle roots, timed on the coordinator's clock and
checked by random openings. No I/O, no clock reads: times are passed in.

Coordinator side: :class:`VerifierSession`. Agent side: ``loom.agent.prover``.
Offline: :func:`verify_evidence`.
"""

from __future__ import annotations

from loom.core.challenge.digest import leaf_bytes, round_digests, tile_digest
from loom.core.challenge.evidence import build_evidence, verify_evidence
from loom.core.challenge.generator import exact_matmul_t, gen_int8
from loom.core.challenge.merkle import MerkleTree, verify_path
from loom.core.challenge.messages import (
    ChallengeResult,
    ChallengeSpec,
    ChallengeStart,
    Evidence,
    NonceRelease,
    Opening,
    OpeningRequest,
    OpeningsRequest,
    OpeningsResponse,
    RootCommit,
)
from loom.core.challenge.opening import OpeningCheck, check_opening, true_tile_digest
from loom.core.challenge.params import (
    ChallengeParams,
    UnknownDeviceClass,
    device_classes,
    params_for,
)
from loom.core.challenge.timing import WindowScore, best_window, format_rate
from loom.core.challenge.transcript import root_statement, round_seed
from loom.core.challenge.verifier import ChallengeStateError, SessionState, VerifierSession

__all__ = [
    "ChallengeParams",
    "ChallengeResult",
    "ChallengeSpec",
    "ChallengeStart",
    "ChallengeStateError",
    "Evidence",
    "MerkleTree",
    "NonceRelease",
    "Opening",
    "OpeningCheck",
    "OpeningRequest",
    "OpeningsRequest",
    "OpeningsResponse",
    "RootCommit",
    "SessionState",
    "UnknownDeviceClass",
    "VerifierSession",
    "WindowScore",
    "best_window",
    "build_evidence",
    "check_opening",
    "device_classes",
    "exact_matmul_t",
    "format_rate",
    "gen_int8",
    "leaf_bytes",
    "params_for",
    "root_statement",
    "round_digests",
    "round_seed",
    "tile_digest",
    "true_tile_digest",
    "verify_evidence",
    "verify_path",
]
