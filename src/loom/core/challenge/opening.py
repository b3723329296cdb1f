"""Checking one opened tile: Merkle path to the signed root, then exact recomputation.

This is the verifier's whole per-opening cost: regenerate b rows of A and b columns of B
(2·b·K int8 values), one (b×K)·(K×b) exact product, one digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from loom.core.challenge.digest import DIGEST_BYTES, digest_in_leaf, tile_digest
from loom.core.challenge.generator import MAT_A, MAT_B, Int32Array, exact_matmul_t, gen_int8
from loom.core.challenge.merkle import verify_path
from loom.core.challenge.messages import ChallengeSpec, Opening
from loom.core.challenge.params import ChallengeParams
from loom.core.challenge.transcript import round_seed

OpeningStatus = Literal["ok", "malformed", "bad_path", "wrong_digest"]


@dataclass(frozen=True)
class OpeningCheck:
    """Outcome of one opening. Only ``wrong_digest`` is transferable evidence of fraud."""

    status: OpeningStatus
    detail: str
    claimed_digest: bytes | None = None
    true_digest: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def recompute_tile(params: ChallengeParams, rseed: bytes, ti: int, tj: int) -> Int32Array:
    """The true b×b tile (ti, tj) of ``C = A·B`` for a round seed."""
    b = params.tile
    a_rows = gen_int8(rseed, MAT_A, np.arange(ti * b, (ti + 1) * b), 0, params.k)
    b_cols = gen_int8(rseed, MAT_B, np.arange(tj * b, (tj + 1) * b), 0, params.k)
    return exact_matmul_t(a_rows, b_cols)


def true_tile_digest(
    spec: ChallengeSpec, round_index: int, nonce: bytes, ti: int, tj: int
) -> bytes:
    """The digest an honest prover commits for tile (round, ti, tj)."""
    rseed = round_seed(spec.challenge_id, spec.seed0, round_index, nonce)
    return tile_digest(recompute_tile(spec.params, rseed, ti, tj), round_index, ti, tj)


def check_opening(spec: ChallengeSpec, nonce: bytes, root: bytes, opening: Opening) -> OpeningCheck:
    """Check ``opening`` against the round's signed ``root`` and released ``nonce``."""
    p = spec.params
    where = f"tile (round {opening.round}, row {opening.tile_row}, col {opening.tile_col})"
    if (
        opening.round >= p.rounds
        or opening.tile_row >= p.tile_rows
        or opening.tile_col >= p.tile_cols
    ):
        return OpeningCheck("malformed", f"{where} is outside the challenge")
    if len(opening.leaf) != p.tile_cols * DIGEST_BYTES:
        return OpeningCheck(
            "malformed",
            f"{where}: leaf has {len(opening.leaf)} bytes, expected {p.tile_cols * DIGEST_BYTES}",
        )
    if not verify_path(opening.leaf, opening.tile_row, p.tile_rows, opening.path, root):
        return OpeningCheck("bad_path", f"{where}: Merkle path does not lead to the signed root")
    claimed = digest_in_leaf(opening.leaf, opening.tile_col)
    true = true_tile_digest(spec, opening.round, nonce, opening.tile_row, opening.tile_col)
    if claimed != true:
        return OpeningCheck(
            "wrong_digest",
            f"{where}: committed digest {claimed.hex()} but the true tile digests to {true.hex()}",
            claimed_digest=claimed,
            true_digest=true,
        )
    return OpeningCheck("ok", f"{where}: correct", claimed_digest=claimed, true_digest=true)
