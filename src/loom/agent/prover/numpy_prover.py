"""CPU prover on NumPy: the reference implementation, and what a CPU device runs."""

from __future__ import annotations

import os
import threading

import numpy as np

from loom.agent.prover.base import Prover, Signer
from loom.core.challenge.digest import DigestArray, round_digests
from loom.core.challenge.generator import MAT_A, MAT_B, gen_int8
from loom.core.challenge.messages import ChallengeSpec

#: Held while a BLAS product runs; every ``fork()`` made by Python code waits for it.
#: OpenBLAS's own fork handler tears its thread pool down, and a product running in another
#: thread at that moment never returns (reproduced: a thread in ``a @ b`` while the event
#: loop spawns a member with a ``preexec_fn`` hangs for ever; the agent then could not
#: exit on SIGTERM). ``subprocess`` runs these hooks for every real fork (with a
#: ``preexec_fn``); its ``vfork`` path runs no fork handlers and needs none.
BLAS_FORK_GATE = threading.Lock()


def _before_fork() -> None:
    BLAS_FORK_GATE.acquire()


def _after_fork() -> None:
    BLAS_FORK_GATE.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)

#: At most this many rows of A per block (a block is also bounded by ``block_bytes``).
MAX_BLOCK_ROWS = 1024


class NumpyProver(Prover):
    """Exact products through float64 BLAS (exact for K ≤ 131071, see ``exact_matmul_t``).

    Works through A in row blocks of at most ``block_bytes`` of float64 so memory stays
    bounded; B (as Bᵀ, N×K) is held whole in float64.
    """

    backend = "numpy"

    def __init__(self, spec: ChallengeSpec, sign: Signer, *, block_bytes: int = 64 << 20) -> None:
        super().__init__(spec, sign)
        self._block_bytes = block_bytes

    def round_digests(self, rseed: bytes, round_index: int) -> DigestArray:
        p = self.params
        b = p.tile
        bt = gen_int8(rseed, MAT_B, np.arange(p.n), 0, p.k).astype(np.float64)
        rows_per_block = max(b, (self._block_bytes // (8 * p.k)) // b * b)
        # Blocks small enough that a cancelled round stops within a fraction of a second.
        rows_per_block = min(rows_per_block, max(b, MAX_BLOCK_ROWS // b * b))
        out = np.empty((p.tile_rows, p.tile_cols, 2), dtype=np.uint32)
        for r0 in range(0, p.m, rows_per_block):
            self.check_cancelled()
            r1 = min(p.m, r0 + rows_per_block)
            a = gen_int8(rseed, MAT_A, np.arange(r0, r1), 0, p.k).astype(np.float64)
            with BLAS_FORK_GATE:  # no fork during the product (see BLAS_FORK_GATE)
                c = (a @ bt.T).astype(np.int32)  # exact: integer partial sums < 2**53
            out[r0 // b : r1 // b] = round_digests(c, round_index, b, first_tile_row=r0 // b)
        return out
