"""Base class of the challenge provers: nonce bookkeeping, commitments, openings."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from loom.core.challenge.digest import DigestArray, leaf_bytes
from loom.core.challenge.merkle import MerkleTree
from loom.core.challenge.messages import (
    ChallengeSpec,
    ChallengeStart,
    NonceRelease,
    Opening,
    OpeningsRequest,
    OpeningsResponse,
    RootCommit,
)
from loom.core.challenge.transcript import root_statement, round_seed

Signer = Callable[[bytes], bytes]
"""Signs a root statement with the node key and returns the 64-byte Ed25519 signature."""


class ProverError(RuntimeError):
    """The prover was asked for something it cannot give (unknown round, wrong challenge)."""


class ProverCancelled(ProverError):
    """The challenge was dropped (aborted, replaced, or the agent is stopping) mid-round."""


class Prover(ABC):
    """Common bookkeeping; subclasses only compute one round's tile digests."""

    backend = "abstract"

    def __init__(self, spec: ChallengeSpec, sign: Signer) -> None:
        # Re-validating re-derives the challenge id from what we were given, so we never sign
        # an id that commits to inputs other than the ones we compute on.
        self.spec = ChallengeSpec.model_validate(spec.model_dump())
        self.params = spec.params
        self._sign = sign
        self._nonces: dict[int, bytes] = {}
        self._digests: dict[int, DigestArray] = {}
        self._trees: dict[int, MerkleTree] = {}
        self._next_round = 0
        # Set from the event loop's thread, read by the computing thread between blocks:
        # a dropped challenge stops burning the supplier's CPU/GPU, and a stopping agent
        # never waits for a round it no longer wants.
        self._cancelled = threading.Event()

    # ------------------------------------------------------------------ nonces
    def add_start(self, start: ChallengeStart) -> None:
        if start.spec.challenge_id != self.spec.challenge_id:
            raise ProverError("ChallengeStart is for another challenge")
        for release in start.nonces:
            self.add_nonce(release)

    def add_nonce(self, release: NonceRelease) -> None:
        if release.challenge_id != self.spec.challenge_id:
            raise ProverError("nonce is for another challenge")
        if release.round >= self.params.rounds:
            raise ProverError(f"nonce for round {release.round} beyond the last round")
        self._nonces[release.round] = release.nonce

    @property
    def next_round(self) -> int:
        return self._next_round

    @property
    def done(self) -> bool:
        """Every round has been committed."""
        return self._next_round >= self.params.rounds

    def ready(self) -> bool:
        """The next round's nonce has arrived."""
        return not self.done and self._next_round in self._nonces

    # ------------------------------------------------------------------ rounds
    def prove_next(self) -> RootCommit | None:
        """Compute and commit the next round, or None while its nonce has not arrived."""
        if not self.ready():
            return None
        return self.compute_round(self._next_round)

    def compute_round(self, round_index: int) -> RootCommit:
        """Compute round ``round_index`` (must be the next one) and return its signed root."""
        if round_index != self._next_round:
            raise ProverError(f"rounds are computed in order: next is {self._next_round}")
        nonce = self._nonces.get(round_index)
        if nonce is None:
            raise ProverError(f"no nonce yet for round {round_index}")
        rseed = round_seed(self.spec.challenge_id, self.spec.seed0, round_index, nonce)
        self.check_cancelled()
        digests = self.round_digests(rseed, round_index)
        self.check_cancelled()
        expected = (self.params.tile_rows, self.params.tile_cols, 2)
        if digests.shape != expected:
            raise ProverError(f"backend returned digests of shape {digests.shape}, not {expected}")
        tree = MerkleTree([leaf_bytes(digests, ti) for ti in range(self.params.tile_rows)])
        statement = root_statement(self.spec.challenge_id, round_index, nonce, tree.root)
        signature = self._sign(statement)
        self._digests[round_index] = digests
        self._trees[round_index] = tree
        self._next_round += 1
        return RootCommit(
            challenge_id=self.spec.challenge_id,
            round=round_index,
            root=tree.root,
            signature=signature,
        )

    @abstractmethod
    def round_digests(self, rseed: bytes, round_index: int) -> DigestArray:
        """All tile digests of one round: shape (M/b, N/b, 2), uint32."""

    # ------------------------------------------------------------------ openings
    def open(self, round_index: int, tile_row: int, tile_col: int) -> Opening:
        """The leaf holding tile (round, row, col) and its Merkle path."""
        tree = self._trees.get(round_index)
        if tree is None:
            raise ProverError(f"round {round_index} was not computed")
        if not (0 <= tile_row < self.params.tile_rows and 0 <= tile_col < self.params.tile_cols):
            raise ProverError(f"tile ({tile_row}, {tile_col}) outside the round")
        return Opening(
            round=round_index,
            tile_row=tile_row,
            tile_col=tile_col,
            leaf=leaf_bytes(self._digests[round_index], tile_row),
            path=tree.path(tile_row),
        )

    def answer(self, request: OpeningsRequest) -> OpeningsResponse:
        if request.challenge_id != self.spec.challenge_id:
            raise ProverError("openings requested for another challenge")
        return OpeningsResponse(
            challenge_id=self.spec.challenge_id,
            openings=[self.open(q.round, q.tile_row, q.tile_col) for q in request.openings],
        )

    def cancel(self) -> None:
        """Stop computing: a round in progress raises :class:`ProverCancelled` at its next
        block boundary (thread-safe; idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`ProverCancelled` once :meth:`cancel` was called; backends call it
        between blocks of a round."""
        if self._cancelled.is_set():
            raise ProverCancelled(f"challenge {self.spec.challenge_id.hex()[:12]} was dropped")

    def discard(self) -> None:
        """Cancel any round in progress and free the stored digests and trees (≈ 8 MB per
        round at H100 sizes)."""
        self.cancel()
        self._digests.clear()
        self._trees.clear()
