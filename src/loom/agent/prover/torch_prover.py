"""GPU prover on PyTorch: ``torch._int_mm`` (INT8×INT8→INT32 on tensor cores) on CUDA.

torch is optional: it is imported lazily, never at module import, so this module loads on
machines without it; :func:`torch_available` and :func:`cuda_available` say what is there.

The generator and digest run the *same* backend-agnostic integer expressions as the NumPy
verifier (``loom.core.challenge.generator`` / ``digest``) on ``torch.int64`` tensors, so
the bytes are identical by construction; the known-answer tests check it. They are not
fused kernels: at H100 sizes the int64 temporaries make generation and digest cost a
sizeable fraction of the GEMM, which any reference rate calibrated on this code absorbs.
Fused kernels (Triton / CuPy RawKernel, design §6.4) are the next step for speed.

Because a wrong digest under a signed root is *evidence of fraud*, a buggy kernel must never
look like cheating. So the prover (1) checks one tile of round 0 against the NumPy reference
before signing it (round 0 only starts the clock, so this costs no timed work; ≈ 60 ms of
CPU at K = 65536), and (2) re-checks every opened tile against the NumPy reference before
answering, refusing to answer (no evidence is created) if its GPU path disagrees. (2) costs
k tile recomputations of agent CPU after the timed part is over.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import numpy as np

from loom.agent.prover.base import Prover, ProverError, Signer
from loom.core.challenge.digest import LANE_KEYS, DigestArray, digest_terms, tile_digest, tile_key
from loom.core.challenge.generator import (
    M32,
    MAT_A,
    MAT_B,
    row_state,
    seed_words,
    word_hash,
)
from loom.core.challenge.messages import ChallengeSpec, OpeningsRequest, OpeningsResponse
from loom.core.challenge.opening import recompute_tile, true_tile_digest

_CHUNK_ELEMENTS = 1 << 24
"""Elements per int64 temporary (128 MiB) in generation and digest."""


@cache
def _torch() -> Any:
    """The torch module, imported on first use (raises ImportError when absent)."""
    return importlib.import_module("torch")


def torch_available() -> bool:
    """True when PyTorch can be imported."""
    try:
        _torch()
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    """True when PyTorch is importable and sees a CUDA device."""
    return torch_available() and bool(_torch().cuda.is_available())


def gen_int8_torch(rseed: bytes, mat: int, row0: int, nrows: int, k: int, device: Any) -> Any:
    """Rows ``row0 .. row0+nrows`` × all K columns of a seeded matrix, as a torch int8 tensor."""
    torch = _torch()
    words = seed_words(rseed)
    out = torch.empty((nrows, k), dtype=torch.int8, device=device)
    w = torch.arange(k // 4, dtype=torch.int64, device=device)[None, :]
    step = max(1, _CHUNK_ELEMENTS // max(1, k // 4))
    for r0 in range(0, nrows, step):
        r1 = min(nrows, r0 + step)
        rows = torch.arange(row0 + r0, row0 + r1, dtype=torch.int64, device=device)
        h = word_hash(row_state(words, mat, rows)[:, None], w)
        lanes = [((h >> (8 * t)) & 0xFF) - 128 for t in range(4)]
        out[r0:r1] = torch.stack(lanes, dim=-1).reshape(r1 - r0, k).to(torch.int8)
    return out


def digests_torch(c: Any, round_index: int, tile: int, first_tile_row: int = 0) -> DigestArray:
    """Tile digests of an int32 tensor ``c`` (rows of C), as (rows/b, N/b, 2) uint32 NumPy."""
    torch = _torch()
    rows, n = int(c.shape[0]), int(c.shape[1])
    b = tile
    tr_total, tc = rows // b, n // b
    device = c.device
    out = np.empty((tr_total, tc, 2), dtype=np.uint32)
    e = torch.arange(b * b, dtype=torch.int64, device=device)[None, None, :]
    tj = torch.arange(tc, dtype=torch.int64, device=device)[None, :]
    step = max(1, _CHUNK_ELEMENTS // (n * b))
    for t0 in range(0, tr_total, step):
        t1 = min(tr_total, t0 + step)
        x = c[t0 * b : t1 * b].to(torch.int64) & M32
        x = x.reshape(t1 - t0, b, tc, b).permute(0, 2, 1, 3).reshape(t1 - t0, tc, b * b)
        ti = torch.arange(
            first_tile_row + t0, first_tile_row + t1, dtype=torch.int64, device=device
        )[:, None]
        tk = tile_key(round_index, ti, tj)[:, :, None]
        for lane, key in enumerate(LANE_KEYS):
            s = digest_terms(x, tk, e, key).sum(dim=-1) & M32
            out[t0:t1, :, lane] = s.cpu().numpy().astype(np.uint32)
    return out


class TorchProver(Prover):
    """Prover on a torch device (``"cuda"`` normally; ``"cpu"`` works for tests).

    ``use_int_mm``: None picks ``torch._int_mm`` on CUDA when the shapes allow it (M > 16,
    K > 16, K and N multiples of 8), else an exact float64 product on the device (exact, but
    slow and 8× the memory: only for tests and small shapes).
    ``self_check``: verify against the NumPy reference (see the module docstring).
    """

    backend = "torch"

    def __init__(
        self,
        spec: ChallengeSpec,
        sign: Signer,
        *,
        device: str = "cuda",
        use_int_mm: bool | None = None,
        self_check: bool = True,
    ) -> None:
        super().__init__(spec, sign)
        torch = _torch()
        self.device = torch.device(device)
        p = self.params
        shapes_ok = p.m > 16 and p.k > 16 and p.k % 8 == 0 and p.n % 8 == 0
        if use_int_mm is None:
            use_int_mm = self.device.type == "cuda" and shapes_ok and hasattr(torch, "_int_mm")
        self.use_int_mm = use_int_mm
        self.self_check = self_check

    def _product(self, a: Any, bt: Any) -> Any:
        torch = _torch()
        if self.use_int_mm:
            return torch._int_mm(a, bt.t())
        return (a.to(torch.float64) @ bt.to(torch.float64).t()).to(torch.int32)

    def round_digests(self, rseed: bytes, round_index: int) -> DigestArray:
        p = self.params
        a = gen_int8_torch(rseed, MAT_A, 0, p.m, p.k, self.device)
        bt = gen_int8_torch(rseed, MAT_B, 0, p.n, p.k, self.device)
        self.check_cancelled()
        c = self._product(a, bt)
        del a, bt
        self.check_cancelled()
        digests = digests_torch(c, round_index, p.tile)
        del c
        if self.self_check and round_index == 0:
            self._check_one_tile(rseed, round_index, digests)
        return digests

    def answer(self, request: OpeningsRequest) -> OpeningsResponse:
        """Answer openings, after re-checking each opened tile against the NumPy reference."""
        response = super().answer(request)
        if self.self_check:
            for op in response.openings:
                nonce = self._nonces[op.round]
                true = true_tile_digest(self.spec, op.round, nonce, op.tile_row, op.tile_col)
                committed = op.leaf[8 * op.tile_col : 8 * op.tile_col + 8]
                if committed != true:
                    raise ProverError(
                        f"committed digest of tile ({op.round}, {op.tile_row}, {op.tile_col}) "
                        f"disagrees with the NumPy reference: GPU path is faulty "
                        f"(backend {self.device}, int_mm={self.use_int_mm}); not answering"
                    )
        return response

    def _check_one_tile(self, rseed: bytes, round_index: int, digests: DigestArray) -> None:
        """Compare one tile with the NumPy reference before the round is signed."""
        p = self.params
        ti = (round_index * 7919) % p.tile_rows
        tj = (round_index * 104729 + 1) % p.tile_cols
        expected = tile_digest(recompute_tile(p, rseed, ti, tj), round_index, ti, tj)
        got = np.ascontiguousarray(digests[ti, tj], dtype="<u4").tobytes()
        if got != expected:
            raise ProverError(
                f"GPU result disagrees with the NumPy reference at round {round_index}, tile "
                f"({ti}, {tj}): refusing to sign (backend {self.device}, "
                f"int_mm={self.use_int_mm})"
            )
